"""emnist-exp: CNN variants on EMNIST in Optuna trials, tracked in MLflow, voted into ensembles."""

import os
import warnings

# TensorFlow's C++ start-up chatter (CUDA probing, CPU flags) buries the progress lines on a CPU box.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Known, harmless notices that would otherwise repeat on every trial.
warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
warnings.filterwarnings("ignore", message=".*is experimental.*")
warnings.filterwarnings("ignore", message=".*regimes for parameter.*")

__version__ = "0.1.0"
