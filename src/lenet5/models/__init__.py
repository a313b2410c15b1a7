"""The model registry. Importing this package registers every architecture below."""

from lenet5.models import keras_lenet, lenet5, lenet5_1998, lenet5_modern, robust_lenet, slim_lenet  # noqa: F401  (registration side effect)
from lenet5.models.registry import (
    DigitClassifier,
    count_parameters,
    create_model,
    describe,
    list_models,
    model_class,
    register_model,
)

__all__ = [
    "DigitClassifier",
    "count_parameters",
    "create_model",
    "describe",
    "list_models",
    "model_class",
    "register_model",
]
