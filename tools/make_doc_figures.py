"""Draw the pictures of the documentation into docs/_static (committed).

    python tools/make_doc_figures.py        # needs matplotlib: pip install "bpfast[plot]"

* training_curves.png: History.plot() of a network trained on the 8x8 digits
  (bpfast's own copy, so no download): training and validation loss per epoch.

Each picture comes from bpfast's public API, so a change of what it draws shows
here when the script is run again. Run it from the repository root (with
PYTHONPATH=src for an in-place build).
"""
import os
import pathlib

os.environ.setdefault("MPLBACKEND", "Agg")  # files only, never a window

import bpfast as bp  # noqa: E402  (after the backend choice)
from bpfast.cli import load_digits  # noqa: E402

STATIC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "_static"


def training_curves(path):
    """Train a small network on the digits and draw its History."""
    X, y, _ = load_digits()
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-12)
    net = bp.Network([bp.Dense(64, 64, activation="relu"), bp.Dense(64, 10)], seed=0)
    history = net.fit(X, y, loss="cross_entropy", optimizer=bp.Adam(lr=1e-3), epochs=30,
                      batch_size=32, validation_split=0.2, metrics=["accuracy"])
    ax = history.plot(path)
    return ax, history


def main():
    STATIC.mkdir(parents=True, exist_ok=True)
    path = STATIC / "training_curves.png"
    _, history = training_curves(path)
    print(f"{path}: {len(history.epoch)} epochs, final val_accuracy "
          f"{history.history['val_accuracy'][-1]:.3f}")


if __name__ == "__main__":
    main()
