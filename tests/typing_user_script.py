"""A small user program of bpfast's public API; tests/test_typing.py runs mypy --strict on it.

It is never imported by the tests; it only has to type-check.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import bpfast as bp


def make_network(n_inputs: int, n_classes: int) -> bp.Network:
    layers = [bp.Dense(n_inputs, 16, activation="relu"),
              bp.Dense(16, 16, activation="leaky_relu", negative_slope=0.1, bias=False),
              bp.Dense(16, n_classes)]
    return bp.Network(layers, dtype="float32", seed=0)


def train(X: NDArray[np.float64], y: NDArray[np.int64]) -> tuple[bp.Network, float]:
    net = make_network(X.shape[1], int(y.max()) + 1)
    loss: bp.Loss = bp.CrossEntropy()
    optimizer: bp.Optimizer = bp.Adam(lr=1e-2, betas=(0.9, 0.999))
    first: float = net.train_step(X, y, loss, optimizer)
    # Network.fit has no annotations yet (being reworked): mypy --strict flags the call
    # as untyped. Once it is annotated, mypy reports these ignores as unused: delete them.
    history: bp.History = net.fit(
        X, y, loss=loss, optimizer=optimizer, epochs=3, batch_size=16, shuffle=True)
    losses: list[float] = history.history["loss"]
    optimizer.lr = 5e-3
    state: dict[str, NDArray[np.floating[Any]]] = optimizer.state
    print(first, losses[-1], optimizer.step_count, sorted(state))
    return net, losses[-1]


def main() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 4))
    y = rng.integers(0, 3, size=64)
    net, _ = train(X, y)
    output: NDArray[np.floating[Any]] = net.predict(X)
    gradient: NDArray[np.floating[Any]] = bp.MSE(half=True).gradient(net.forward(X),
                                                                np.zeros_like(output))
    value: float = bp.MSE()(output, np.zeros_like(output))
    parameters: NDArray[np.floating[Any]] = net.parameters
    weight: NDArray[np.floating[Any]] | None = net.layers[0].weight
    regression = bp.Network([bp.Dense(4, 1)], dtype="float64")
    regression.fit(X, X[:, 0], loss="mse",
                   optimizer=bp.SGD(lr=0.1, momentum=0.9), epochs=2)
    for loss in (bp.L1(), bp.Huber(delta=0.5), bp.BinaryCrossEntropy(from_logits=True)):
        print(type(loss).__name__)
    for optimizer in (bp.AdamW(), bp.RMSprop(centered=True), bp.Adagrad(lr_decay=0.01)):
        print(optimizer.lr)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.npz"
        net.save(path)
        bp.save(net, str(path), metadata={"note": "typed"})
        loaded: bp.Network = bp.load(path)
        again, optimizer_or_none = bp.load(path, with_optimizer=True)
        header: dict[str, object] = bp.io.read_header(path)
    shape = None if weight is None else weight.shape
    print(value, parameters.shape, shape, gradient.shape, loaded.n_parameters, again.dtype,
          optimizer_or_none, header["format"], bp.__version__)


if __name__ == "__main__":
    main()
