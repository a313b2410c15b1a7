"""lenet5: train, evaluate, explain and serve LeNet-5 digit recognisers on MNIST."""

__version__ = "0.1.0"

from lenet5.errors import CheckpointError, ConfigError, DataError, DownloadError, Lenet5Error
from lenet5.models import create_model, list_models

__all__ = [
    "__version__",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DownloadError",
    "Lenet5Error",
    "create_model",
    "list_models",
]
