"""bpfast: fast, exact backpropagation for dense neural networks on the CPU."""
__version__ = "0.1.0"

# _threads first: it loads the compiled core with the right OpenMP settings
from ._threads import get_num_threads, set_num_threads, show_config, threads  # noqa: I001
from . import callbacks, metrics, schedules
from ._training import DivergenceError
from .callbacks import History
from .explain import explain
from .io import load, save
from .layers import (
    ACTIVATIONS,
    Activation,
    BatchNorm1d,
    CustomActivation,
    Dense,
    Dropout,
    LayerNorm,
)
from .losses import L1, MSE, BinaryCrossEntropy, CrossEntropy, CustomLoss, Huber, Loss
from .network import Network
from .optimizers import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

__all__ = [
    "ACTIVATIONS", "Activation", "Adagrad", "Adam", "AdamW", "BatchNorm1d", "BinaryCrossEntropy",
    "CrossEntropy", "CustomActivation", "CustomLoss", "Dense", "DivergenceError", "Dropout",
    "History", "explain", "Huber", "L1", "LayerNorm", "Loss", "MSE", "Network", "Optimizer",
    "RMSprop", "SGD", "callbacks", "get_num_threads", "load", "metrics", "save", "schedules",
    "set_num_threads", "show_config", "threads",
]
