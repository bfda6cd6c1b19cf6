# Type stub of the compiled core (private: the public API is in bpfast/__init__.py).

import numpy as np
from numpy.typing import NDArray

ACTIVATIONS: tuple[str, ...]
LOSSES: tuple[str, ...]
OPTIMIZERS: tuple[str, ...]
PARALLEL_MIN_WORK: int

def openmp_enabled() -> bool: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def kernel_info() -> tuple[str, bool]: ...
def first_nonfinite(array: NDArray[np.floating]) -> int: ...

class LossConfig:
    def __init__(self, name: str, param: float = ...) -> None: ...
    @property
    def name(self) -> str: ...
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
    n_layers: int
    n_parameters: int
    n_inputs: int
    n_outputs: int
    capacity: int
    forward_rows: int
    dtype: np.dtype
    parameters: NDArray[np.floating]
    gradients: NDArray[np.floating]
    def __init__(self, layer_table: list[tuple[int, int, int, float, int, int]],
                 parameters: NDArray[np.floating], gradients: NDArray[np.floating]) -> None: ...
    def reserve(self, n_rows: int) -> None: ...
    def assign_parameters(self, values: NDArray[np.floating]) -> None: ...
    def layer_output(self, layer: int) -> NDArray[np.floating]: ...
    def train_step(self, x: NDArray[np.floating], target: NDArray[np.floating] | None,
                   labels: NDArray[np.intp] | None, weights: NDArray[np.float64] | None,
                   loss: LossConfig, optimizer: OptimizerConfig | None, l2: float = ...,
                   clip_value: float = ..., clip_norm: float = ...) -> float: ...
    def train_epoch(self, x: NDArray[np.floating], target: NDArray[np.floating] | None,
                    labels: NDArray[np.intp] | None, weights: NDArray[np.float64] | None,
                    order: NDArray[np.intp] | None, batch_size: int, loss: LossConfig,
                    optimizer: OptimizerConfig, l2: float = ..., clip_value: float = ...,
                    clip_norm: float = ..., batch_lrs: NDArray[np.float64] | None = ...,
                    check_signals: bool = ...) -> tuple[float, float, int, bool]: ...
    def forward(self, x: NDArray[np.floating]) -> NDArray[np.floating]: ...
    def backward(self, grad_output: NDArray[np.floating],
                 want_grad_input: bool) -> NDArray[np.floating] | None: ...
    def predict(self, x: NDArray[np.floating], chunk_rows: int) -> NDArray[np.floating]: ...
