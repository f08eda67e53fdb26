"""Metrics and lm-eval task definitions for vlmlab."""
