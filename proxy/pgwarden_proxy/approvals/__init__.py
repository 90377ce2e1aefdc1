"""Approval backends: statements held until a person approves them (files now, Kubernetes later)."""
