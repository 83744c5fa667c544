"""emnist-exp: CNN variants on EMNIST in Optuna trials, tracked in MLflow, voted into ensembles."""

__version__ = "0.1.0"
