"""Per-method defaults (the yaml files beside this one) and the allowed range of every value (rules.py)."""
