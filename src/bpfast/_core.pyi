# Type stub of the compiled core (private: the public API is in bpfast/__init__.py).

from collections.abc import Callable
from enum import IntEnum
from typing import Any, Generic, Literal, TypeVar, overload

import numpy as np
from numpy.typing import NDArray

class Activation(IntEnum):
    ACT_IDENTITY = 0
    ACT_SIGMOID = 1
    ACT_TANH = 2
    ACT_RELU = 3
    ACT_LEAKY_RELU = 4
    ACT_ELU = 5
    ACT_SOFTPLUS = 6
    ACT_GELU = 7
    ACT_SOFTMAX = 8
    ACT_SILU = 9
    ACT_MISH = 10
    ACT_HARDTANH = 11
    ACT_SELU = 12
    ACT_SOFTSIGN = 13
    ACT_CUSTOM = 14

class Loss(IntEnum):
    LOSS_MSE = 0
    LOSS_L1 = 1
    LOSS_HUBER = 2
    LOSS_CROSS_ENTROPY = 3
    LOSS_CROSS_ENTROPY_PROBS = 4
    LOSS_BINARY_CROSS_ENTROPY = 5
    LOSS_BINARY_CROSS_ENTROPY_PROBS = 6
    LOSS_CUSTOM = 7

class Reduction(IntEnum):
    REDUCTION_MEAN = 0
    REDUCTION_SUM = 1

class Optimizer(IntEnum):
    OPT_SGD = 0
    OPT_ADAM = 1
    OPT_RMSPROP = 2
    OPT_ADAGRAD = 3

class LayerKind(IntEnum):
    KIND_DENSE = 0
    KIND_DROPOUT = 1
    KIND_BATCH_NORM1D = 2
    KIND_LAYER_NORM = 3
    KIND_ACTIVATION = 4

ACTIVATIONS: tuple[str, ...]
LOSSES: tuple[str, ...]
REDUCTIONS: tuple[str, ...]
OPTIMIZERS: tuple[str, ...]
LAYER_KINDS: tuple[str, ...]
PARALLEL_MIN_WORK: int
PRODUCT_SPLIT: tuple[int, int, int]  # (SPLIT_MIN_WORK, BLOCK_WIDTH, MAX_BLOCKS)

def openmp_enabled() -> bool: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def kernel_info() -> tuple[str, bool]: ...
def set_blas_thread_functions(set_address: int, get_address: int) -> None: ...
def set_blas_num_threads(n: int) -> None: ...
def set_adaptive(adaptive: bool) -> None: ...
ELEMENTWISE_PASSES: tuple[str, ...]
def product_timings() -> list[tuple[int, int, int, float, float, bool]]: ...
def first_nonfinite(array: NDArray[np.floating]) -> int: ...
def ready_array(array: object, dtype: np.dtype[Any], ndim: int) -> bool: ...
def ready_labels(labels: object, n_rows: int, n_classes: int) -> bool: ...

BUSY_MESSAGE: str
FITTING_MESSAGE: str

class PythonCallback:
    def __init__(self, function: object) -> None: ...
    @property
    def function(self) -> object: ...

class LossConfig:
    def __init__(self, name: str, param: float = ..., reduction: str = ...,
                 custom: object = ...) -> None: ...
    @property
    def callback(self) -> PythonCallback | None: ...
    @property
    def name(self) -> str: ...
    @property
    def reduction(self) -> str: ...
    def evaluate(self, out: NDArray[np.floating], target: NDArray[np.floating] | None,
                 labels: NDArray[np.intp] | None,
                 grad: NDArray[np.floating] | None,
                 weights: NDArray[np.float64] | None = ...) -> float: ...

class OptimizerConfig:
    step_count: int
    state: NDArray[np.floating] | None
    state_names: tuple[str, ...]
    owner: Engine | None
    lr: float
    def __init__(self, name: str, *, lr: float, momentum: float = ..., dampening: float = ...,
                 nesterov: bool = ..., weight_decay: float = ..., beta1: float = ...,
                 beta2: float = ..., eps: float = ..., amsgrad: bool = ..., alpha: float = ...,
                 centered: bool = ..., lr_decay: float = ...,
                 initial_accumulator_value: float = ...,
                 decoupled_weight_decay: bool = ...) -> None: ...
    def check_owner(self, engine: Engine) -> None: ...
    def attach(self, engine: Engine) -> None: ...
    def step(self, engine: Engine) -> None: ...

class Engine:
    """The base of Engine32 and Engine64: layer table and lock."""
    n_layers: int
    n_parameters: int
    n_inputs: int
    n_outputs: int
    capacity: int
    forward_rows: int
    forward_training: bool
    has_batch_norm: bool
    n_buffers: int
    dtype: np.dtype
    parameters: NDArray[np.floating]
    gradients: NDArray[np.floating]
    buffers: NDArray[np.floating]
    stream: tuple[int, int]
    def __init__(self, layer_table: list[tuple[Any, ...]],
                 parameters: NDArray[np.floating], gradients: NDArray[np.floating],
                 buffers: NDArray[np.floating] | None = ...) -> None: ...
    _after_release: Callable[[], object] | None
    lock_state: dict[str, int | bool]
    def reserve(self, n_rows: int) -> None: ...
    def claim(self) -> None: ...
    def check_owner(self) -> None: ...
    def unclaim(self) -> None: ...
    def snapshot(self, optimizer: OptimizerConfig | None = ...,
                 read: Callable[[], Any] | None = ...
                 ) -> tuple[NDArray[np.floating], NDArray[np.floating] | None, int, Any]: ...
    def assign_parameters(self, values: NDArray[np.floating]) -> None: ...
    def assign_buffers(self, values: NDArray[np.floating]) -> None: ...
    def layer_output(self, layer: int) -> NDArray[np.floating]: ...

_F = TypeVar("_F", np.float32, np.float64)

class _TypedEngine(Engine, Generic[_F]):
    """Stub only: what Engine32 (float32) and Engine64 (float64) add, from one template."""
    def train_step(self, x: NDArray[_F], target: NDArray[_F] | None,
                   labels: NDArray[np.intp] | None, weights: NDArray[np.float64] | None,
                   loss: LossConfig, optimizer: OptimizerConfig | None, l2: float = ...,
                   clip_value: float = ..., clip_norm: float = ...) -> float: ...
    def scale_gradients(self, factor: float) -> None: ...
    def apply_gradients(self, loss_value: float, optimizer: OptimizerConfig | None = ...,
                        l2: float = ..., clip_value: float = ..., clip_norm: float = ...
                        ) -> float: ...
    def train_epoch(self, x: NDArray[_F], target: NDArray[_F] | None,
                    labels: NDArray[np.intp] | None, weights: NDArray[np.float64] | None,
                    order: NDArray[np.intp] | None, batch_size: int, loss: LossConfig,
                    optimizer: OptimizerConfig, l2: float = ..., clip_value: float = ...,
                    clip_norm: float = ..., batch_lrs: NDArray[np.float64] | None = ...,
                    check_signals: bool = ..., totals: NDArray[np.float64] | None = ...
                    ) -> tuple[float, float, int, bool]: ...
    def forward(self, x: NDArray[_F], training: bool = ...) -> NDArray[_F]: ...
    @overload
    def backward(self, grad_output: NDArray[_F],
                 want_grad_input: Literal[True]) -> NDArray[_F]: ...
    @overload
    def backward(self, grad_output: NDArray[_F], want_grad_input: Literal[False]) -> None: ...
    def predict(self, x: NDArray[_F], chunk_rows: int) -> NDArray[_F]: ...

class Engine32(_TypedEngine[np.float32]): ...
class Engine64(_TypedEngine[np.float64]): ...

# Engine32 or Engine64, by the network's dtype: one type, so that callers holding
# an array of either float dtype type-check
ENGINES: dict[np.dtype[Any], type[_TypedEngine[Any]]]
