"""Masking of personal data in results: rules, catalog, lineage, detectors and strategies."""
