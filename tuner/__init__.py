"""tuner: hyperparameter studies for deep learning (Optuna search, MLflow tracking, ensembles)."""


def __getattr__(name: str) -> str:
    """`tuner.__version__`, looked up when asked (importlib.metadata costs every command,
    `study status` included, a twentieth of a second)."""
    if name != "__version__":
        raise AttributeError(f"module 'tuner' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuner")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "0.0.0+unknown"
