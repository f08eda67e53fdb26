"""vlmlab's orchestrator: CLI, config, Ray launching, MLflow tracking, cost and manifests."""
__version__ = "0.1.0"
