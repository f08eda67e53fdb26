"""What every stage stands on: errors, the validated config, secrets, atomic writes and leases, the manifest, cost,
MLflow tracking, Ray (local or a cluster) and the worker side of the console.

The floors read ``evals <- runtime <- stages <- harness``: this package imports ``evals`` and itself only, never a
stage (``stages/``) nor a command (``harness/``); tests/test_layers.py keeps it so.
"""
