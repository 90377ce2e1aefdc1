"""Approval backends: a statement held until a person decides (files for local use,
ApprovalRequest resources in Kubernetes)."""
