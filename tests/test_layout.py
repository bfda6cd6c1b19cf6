"""The package's layout: what ships in it, and how its modules depend on each other.

* The NumPy oracle is a test (tests/oracle.py): nothing in bpfast imports it and the
  package has no copy of it.
* The modules' top-level imports form no cycle (bpfast/__init__.py, which imports
  them all, aside), so each module can be imported first, in a fresh interpreter.
* Saving reads a network only through its state protocol (Network._get_state and
  _from_state, which pickling uses too), never its engine or RNG directly.
"""
import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

import bpfast as bp

PACKAGE = pathlib.Path(bp.__file__).parent
MODULES = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def _top_level_statements(body):
    """Statements run at import: into if/try blocks (not `if TYPE_CHECKING:`), never
    into functions or classes."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from _top_level_statements(node.body)
            yield from _top_level_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse,
                          node.finalbody):
                yield from _top_level_statements(block)
        else:
            yield node


def _imported_modules(path):
    """The bpfast modules that the module at path imports when it is imported."""
    found = set()
    for node in _top_level_statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import name: a module, or an attribute of the package
                found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bpfast."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith("bpfast.")}
    return found & set(MODULES)


def _cycle(graph):
    """One import cycle as a list of module names, or None."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for other in sorted(graph[name]):
            cycle = visit(other)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def test_the_oracle_is_not_part_of_the_package():
    assert importlib.util.find_spec("bpfast._reference") is None
    assert not (PACKAGE / "_reference.py").exists()
    for name, path in MODULES.items():
        assert "_reference" not in path.read_text(), name
    assert (pathlib.Path(__file__).parent / "oracle.py").is_file()


def test_top_level_imports_form_no_cycle():
    graph = {name: _imported_modules(path) for name, path in MODULES.items()}
    assert "network" in graph["io"]  # the check sees relative imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"io": {"network"}, "network": {"layers", "io"}, "layers": set()}) in (
        ["io", "network", "io"], ["network", "io", "network"])


@pytest.mark.parametrize("first,second", [("io", "network"), ("network", "io")])
def test_io_and_network_import_in_either_order(first, second):
    code = (f"import bpfast.{first}, bpfast.{second}; "
            "import bpfast; print(bpfast.io.Network is bpfast.network.Network)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ,
                                           "PYTHONPATH": str(PACKAGE.parent)})
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]


def test_saving_reads_a_network_only_through_its_state_protocol():
    tree = ast.parse(MODULES["io"].read_text())
    private = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.startswith("__")}
    assert private <= {"_get_state", "_from_state", "_restore"}, private


@pytest.mark.parametrize("activation", [None, *bp.ACTIVATIONS])
def test_a_layer_has_one_description(activation):
    """A layer is described once (describe/from_description): pickling, saving and the
    engine's table all read it, so a layer rebuilt from it is the same layer."""
    from bpfast.layers import from_description
    keyword = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 0.7}}.get(activation, {})
    layer = bp.Dense(3, 4, activation, bias=activation != "tanh", init="normal", **keyword)
    spec = layer.describe()
    json.dumps(spec)  # plain values only
    assert from_description(spec).describe() == spec
    assert from_description({k: spec[k] for k in bp.Dense.FILE_FIELDS}).describe() == {
        **spec, "init": None}
    net = bp.Network([bp.Dense(2, 3), layer], seed=0)
    assert net._get_state()["layers"][1] == spec
    row = layer.engine_row(0, 12)
    assert row[:4] == (3, 4, bp.ACTIVATIONS.index(layer.activation), layer.activation_param)
    with pytest.raises(ValueError, match="unknown layer kind"):
        from_description({**spec, "kind": "conv2d"})
