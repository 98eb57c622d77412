"""Model families: one module each, found by the registry (components/registry.py)."""
