"""Render the pictures of the documentation that come from bpfast itself.

    PYTHONPATH=src python tools/make_doc_figures.py

writes docs/_static/backprop_mazur.svg: ``bp.explain``'s ``to_dot()`` graph of Matt
Mazur's 2-2-2 sigmoid network (values and gradients of one step), rendered by
Graphviz's ``dot``. The SVG is committed, so building the docs needs no Graphviz;
rerun this after changing bpfast.explain's graph.
"""
import pathlib
import shutil
import subprocess
import sys

import bpfast as bp
from bpfast.explain import example

STATIC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "_static"


def main():
    if shutil.which("dot") is None:
        sys.exit("Graphviz's dot is needed to render the figures (apt-get install graphviz)")
    case = example("mazur")
    trace = bp.explain(case["net"], case["X"], case["y"], case["loss"], case["optimizer"])
    STATIC.mkdir(parents=True, exist_ok=True)
    target = STATIC / "backprop_mazur.svg"
    svg = subprocess.run(["dot", "-Tsvg"], input=trace.to_dot(), capture_output=True,
                         text=True, check=True, timeout=60).stdout
    target.write_text(svg, encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
