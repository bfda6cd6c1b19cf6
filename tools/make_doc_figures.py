"""Render the pictures of the documentation that come from bpfast itself (committed).

    PYTHONPATH=src python tools/make_doc_figures.py [NAME ...]

writes into docs/_static:

* backprop_mazur.svg: ``bp.explain``'s ``to_dot()`` graph of Matt Mazur's 2-2-2
  sigmoid network (values and gradients of one step), rendered by Graphviz's ``dot``
  (``apt-get install graphviz``);
* training_curves.png: ``History.plot()`` of a network trained on the 8x8 digits
  (bpfast's own copy, so no download): training and validation loss per epoch
  (needs matplotlib: ``pip install "bpfast[plot]"``).

The files are committed, so building the docs needs neither Graphviz nor matplotlib;
rerun this after changing what bpfast.explain's graph or History.plot draws. Names
on the command line (``backprop_mazur``, ``training_curves``) pick some figures.
"""
import os
import pathlib
import shutil
import subprocess
import sys

os.environ.setdefault("MPLBACKEND", "Agg")  # files only, never a window

import bpfast as bp  # noqa: E402  (after the backend choice)
from bpfast.cli import load_digits  # noqa: E402
from bpfast.explain import example  # noqa: E402

STATIC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "_static"


def backprop_mazur():
    """The to_dot() graph of one explained step of the 2-2-2 tutorial network."""
    if shutil.which("dot") is None:
        sys.exit("Graphviz's dot is needed to render the graph (apt-get install graphviz)")
    case = example("mazur")
    trace = bp.explain(case["net"], case["X"], case["y"], case["loss"], case["optimizer"])
    target = STATIC / "backprop_mazur.svg"
    svg = subprocess.run(["dot", "-Tsvg"], input=trace.to_dot(), capture_output=True,
                         text=True, check=True, timeout=60).stdout
    target.write_text(svg, encoding="utf-8")
    return target


def training_curves():
    """Train a small network on the digits and draw its History."""
    X, y, _ = load_digits()
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-12)
    net = bp.Network([bp.Dense(64, 64, activation="relu"), bp.Dense(64, 10)], seed=0)
    history = net.fit(X, y, loss="cross_entropy", optimizer=bp.Adam(lr=1e-3), epochs=30,
                      batch_size=32, validation_split=0.2, metrics=["accuracy"])
    target = STATIC / "training_curves.png"
    history.plot(target)
    return target


FIGURES = {"backprop_mazur": backprop_mazur, "training_curves": training_curves}


def main(names):
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        sys.exit(f"unknown figure {unknown[0]!r}; figures: {', '.join(FIGURES)}")
    STATIC.mkdir(parents=True, exist_ok=True)
    for name in names or FIGURES:
        print(f"wrote {FIGURES[name]()}")


if __name__ == "__main__":
    main(sys.argv[1:])
