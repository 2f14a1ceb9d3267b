"""tuner: hyperparameter studies for deep learning (Optuna search, MLflow tracking, ensembles)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tuner")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0.0.0+unknown"
