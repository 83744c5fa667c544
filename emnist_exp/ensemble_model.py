"""The ensemble pyfunc as a model from code: MLflow runs this file to make the model, nothing is pickled."""

import mlflow

from emnist_exp.serving import EnsembleModel

mlflow.models.set_model(EnsembleModel())
