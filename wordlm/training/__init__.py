"""The parts the training loop (:mod:`wordlm.trainer`) is built from; each holds its own state."""

from .callbacks import Callback, WindowLength
from .checkpoints import CheckpointManager, Interrupted
from .meters import IntervalMeter, Throughput
from .step import LossTerm, TrainStep, forward_loss

__all__ = ["Callback", "CheckpointManager", "Interrupted", "IntervalMeter", "LossTerm", "Throughput", "TrainStep",
           "WindowLength", "forward_loss"]
