"""Trainer configs: `get_config()` files for train.py / eval.py (tiny = embedded default)."""
