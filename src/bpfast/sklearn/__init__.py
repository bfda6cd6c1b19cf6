"""scikit-learn estimators that train on bpfast's engine: MLPClassifier and MLPRegressor."""
from ._base import MLPClassifier, MLPRegressor

__all__ = ["MLPClassifier", "MLPRegressor"]
