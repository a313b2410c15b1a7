"""Training: TrainConfig, optimizers and schedules, and the loop that writes a run folder."""

from lenet5.train.config import TrainConfig
from lenet5.train.loop import Callback, FitResult, TrainingError, fit, resume
from lenet5.train.step import TrainStep, train_epoch

__all__ = ["Callback", "FitResult", "TrainConfig", "TrainingError", "fit", "TrainStep", "resume", "train_epoch"]
