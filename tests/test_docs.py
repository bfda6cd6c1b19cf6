"""Every code example in README.md and docs/*.rst runs, so no example rots.

What runs (plain pytest, no Sphinx needed: the files are read with a few patterns):

* README.md: each fenced ```python block;
* docs/*.rst: the body of each ``.. code-block:: python`` (or ``pycon``) directive,
  each doctest block (a paragraph whose first line starts with ``>>>``), and
  sphinx.ext.doctest's ``.. doctest::``, ``.. testsetup::`` and ``.. testcode::``
  (whose printed output must match the ``.. testoutput::`` after it).

Other blocks (``bash``, ``text``, ``console``, ``::`` literal blocks) are shown, not
run, and so is anything inside another directive (a ``.. note::``, say). A block that
starts with ``>>>`` runs under doctest, which compares what it prints with the page
(ELLIPSIS and NORMALIZE_WHITESPACE on); any other block runs as a script. The blocks
of one file run in order in one namespace, in a fresh temporary directory (so files
they write land there), as a reader would type them into one session; each block is
one test, named by its file and first line.

A block that needs an optional package (torch, onnx, onnxruntime, skl2onnx, mpi4py,
dask, distributed, matplotlib, tqdm, sklearn, pandas) is skipped when the package is
missing: the package is found from the block's import statements, from a comment
``# requires: torch`` in the block (for a need no import shows, as ``net.to_torch()``),
or from the ModuleNotFoundError the block raises. A block that cannot run inside a
test at all (a script for ``mpiexec``, a cluster's address) says why in a comment
``# not run: <reason>``, and is reported as skipped with that reason. Blocks after a
skipped one must not depend on it. Pages merged from other branches are covered as
soon as they exist; conf.py's build-time placeholders for missing pages are skipped.
"""
import ast
import contextlib
import doctest
import importlib.util
import io
import pathlib
import re
import textwrap
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PLACEHOLDER_MARK = ".. bpfast-docs placeholder"
OPTIONAL = {"torch", "onnx", "onnxruntime", "skl2onnx", "mpi4py", "dask", "distributed",
            "matplotlib", "tqdm", "sklearn", "pandas", "jax", "graphviz"}
REQUIRES = re.compile(r"#\s*requires:\s*([\w, .]+)")
NOT_RUN = re.compile(r"^\s*#\s*not run:\s*(.+)$", re.MULTILINE)
DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


class Block:
    """One example: its source, the file and line it starts at, and how it runs."""

    def __init__(self, path, line, source):
        self.path, self.line, self.source = path, line, source
        self.is_doctest = source.lstrip().startswith(">>>")
        #: what the block must print: a ``.. testoutput::`` after a ``.. testcode::``
        self.expected_output = None

    @property
    def id(self):
        inside = ROOT in self.path.parents
        return f"{self.path.relative_to(ROOT) if inside else self.path.name}:{self.line}"

    def code(self):
        """The Python code of the block (a doctest's statements without prompts)."""
        if not self.is_doctest:
            return self.source
        return "\n".join(example.source for example in
                         doctest.DocTestParser().get_examples(self.source))

    def requirements(self):
        """The optional packages the block names in its imports or `# requires:`."""
        names = {name.strip().split(".")[0]
                 for match in REQUIRES.finditer(self.source) for name in match[1].split(",")}
        try:
            tree = ast.parse(self.code())
        except SyntaxError:
            return names & OPTIONAL  # the test reports the syntax error itself
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        return names & OPTIONAL


def markdown_blocks(path):
    """The ```python blocks of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() in ("```python", "```py", "```pycon"):
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append(Block(path, start + 1, "\n".join(lines[start:number - 1])))
            start = None
    return blocks


def _indented_body(lines, index, indent):
    """The lines after a directive or `::` (index is its line) that are indented deeper
    than `indent`, and the index after them. Option lines (:name:) are left out."""
    body, end = [], index + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
        end += 1
    while body and re.match(r"\s*:[\w-]+:", body[0]):
        body.pop(0)
    return textwrap.dedent("\n".join(body)).strip("\n"), end


def rst_blocks(path):
    """The code-block:: python bodies and the doctest blocks of a reStructuredText file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index, previous_blank = [], 0, True
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        directive = re.match(r"\.\.\s+(code-block|code|sourcecode|doctest|testsetup|testcode"
                             r"|testoutput)::\s*(\w*)", stripped)
        if directive:
            kind, language = directive[1], directive[2]
            body, end = _indented_body(lines, index, indent)
            runs = (kind in ("doctest", "testsetup", "testcode")
                    or language in ("python", "py", "pycon", "python3"))
            if body and runs:
                first = index + 1 + next(i for i, text in enumerate(lines[index + 1:])
                                         if text.strip() and not text.strip().startswith(":"))
                blocks.append(Block(path, first + 1, body))
                blocks[-1].is_testcode = kind == "testcode"
            elif kind == "testoutput" and blocks and getattr(blocks[-1], "is_testcode", False):
                blocks[-1].expected_output = body + "\n"
            index, previous_blank = end, not lines[end - 1].strip()
            continue
        literal_block_follows = stripped.endswith("::") and not stripped.startswith(">>>")
        if stripped.startswith("..") or literal_block_follows:
            # a comment or another directive, or a paragraph before a literal block:
            # its indented body is shown, not run
            _, end = _indented_body(lines, index, indent)
            index, previous_blank = end, not lines[end - 1].strip()
            continue
        if stripped.startswith(">>>") and previous_blank:
            end = index
            while end < len(lines) and lines[end].strip():
                end += 1
            blocks.append(Block(path, index + 1, textwrap.dedent("\n".join(lines[index:end]))))
            index, previous_blank = end, False
            continue
        previous_blank = not stripped
        index += 1
    return blocks


def documented_files():
    files = [ROOT / "README.md"]
    for path in sorted(DOCS.glob("*.rst")):
        if not path.read_text(encoding="utf-8").startswith(PLACEHOLDER_MARK):
            files.append(path)
    return [path for path in files if path.exists()]


def all_blocks():
    blocks = []
    for path in documented_files():
        blocks += markdown_blocks(path) if path.suffix == ".md" else rst_blocks(path)
    return blocks


BLOCKS = all_blocks()


class Session:
    """One file's namespace and working directory, and how far its blocks have run."""

    def __init__(self, directory):
        self.namespace = {"__name__": "__doc_example__"}
        self.directory = directory
        self.next_index = 0


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    return {}


def _missing(names):
    return sorted(name for name in names if importlib.util.find_spec(name) is None)


def _optional_module_missing(error):
    """The optional package whose absence raised error (through its causes), or None."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name:
            name = error.name.split(".")[0]
            if name in OPTIONAL:
                return name
        error = error.__cause__ or error.__context__
    return None


def _run(block, namespace):
    """Run one block in namespace; raise AssertionError with the page's line numbers."""
    if block.is_doctest:
        test = doctest.DocTestParser().get_doctest(block.source, namespace, block.id,
                                                   str(block.path), block.line - 1)
        output = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
        runner.run(test, out=output.write, clear_globs=False)
        namespace.update(test.globs)  # DocTest ran in a copy: what it defined carries on
        if runner.failures:
            missing = re.search(r"ModuleNotFoundError: No module named '(\w+)", output.getvalue())
            if missing and missing[1] in OPTIONAL:
                pytest.skip(f"needs {missing[1]}")
            pytest.fail(f"doctest in {block.id} failed:\n{output.getvalue()}", pytrace=False)
        return
    code = compile("\n" * (block.line - 1) + block.source, str(block.path), "exec")
    if block.expected_output is None:
        exec(code, namespace)
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, namespace)
    checker = doctest.OutputChecker()
    if not checker.check_output(block.expected_output, printed.getvalue(), DOCTEST_FLAGS):
        example = doctest.Example(block.source, block.expected_output)
        pytest.fail(f"{block.id} printed other than its testoutput:\n"
                    + checker.output_difference(example, printed.getvalue(), DOCTEST_FLAGS),
                    pytrace=False)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
# examples keep their fits short, and scikit-learn says so each time
@pytest.mark.filterwarnings("ignore:.*Maximum iterations")
def test_example_runs(block, sessions, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # History.plot() in an example never opens a window
    if block.path not in sessions:
        sessions[block.path] = Session(tmp_path_factory.mktemp(block.path.stem))
    session = sessions[block.path]
    monkeypatch.chdir(session.directory)
    same_file = [other for other in BLOCKS if other.path == block.path]
    index = same_file.index(block)
    # a run of selected tests (-k) still runs the earlier blocks of the file first
    for earlier in same_file[session.next_index:index]:
        if not _missing(earlier.requirements()) and not NOT_RUN.search(earlier.source):
            try:
                _run(earlier, session.namespace)
            except BaseException:  # noqa: B036  (its own test reports it)
                pass
    session.next_index = index + 1
    not_run = NOT_RUN.search(block.source)
    if not_run:
        pytest.skip(f"not run: {not_run[1]}")
    missing = _missing(block.requirements())
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    try:
        _run(block, session.namespace)
    except Exception as error:
        name = _optional_module_missing(error)
        if name:
            pytest.skip(f"needs {name}")
        pytest.fail(f"the example at {block.id} raised:\n{traceback.format_exc()}",
                    pytrace=False)


def test_examples_are_found():
    """The extraction finds the examples: the README's quick start, and code blocks and
    doctests in the docs pages (a pattern that stopped matching would pass silently)."""
    if not (DOCS / "conf.py").exists():  # tools/build_wheel.sh runs a copy of tests/ alone
        pytest.skip("no docs/ beside this tests/ directory")
    by_file = {}
    for block in BLOCKS:
        by_file.setdefault(block.path.name, []).append(block)
    assert len(by_file.get("README.md", [])) >= 2
    rst_files = [name for name in by_file if name.endswith(".rst")]
    assert len(rst_files) >= 5
    assert any(block.is_doctest for block in BLOCKS)


def test_extraction_of_each_kind_of_block(tmp_path):
    """A page with each kind of block yields the Python ones, with their line numbers."""
    page = tmp_path / "page.rst"
    page.write_text(textwrap.dedent("""\
        Title
        =====

        .. code-block:: python
           :caption: an example

           x = 1
           y = x + 1

        A literal block, shown only::

           not python at all

        .. code-block:: bash

           pip install bpfast

        >>> print(y)
        2
        >>> z = y * 2

        .. note::

           >>> inside a note, shown

        .. testcode::

           print(x + y + z)

        .. testoutput::

           7
        """))
    blocks = rst_blocks(page)
    assert [(block.line, block.source, block.is_doctest) for block in blocks] == [
        (7, "x = 1\ny = x + 1", False), (18, ">>> print(y)\n2\n>>> z = y * 2", True),
        (28, "print(x + y + z)", False)]
    assert blocks[-1].expected_output == "7\n"
    namespace = {}
    for block in blocks:
        _run(block, namespace)
    blocks[-1].expected_output = "8\n"
    with pytest.raises(pytest.fail.Exception, match="printed other than its testoutput"):
        _run(blocks[-1], namespace)
    assert NOT_RUN.search("import x\n# not run: needs a cluster\n")[1] == "needs a cluster"
    readme = tmp_path / "README.md"
    readme.write_text("text\n\n```python\nimport torch\nz = 3\n```\n\n```bash\nls\n```\n")
    [block] = markdown_blocks(readme)
    assert (block.line, block.source, block.requirements()) == (4, "import torch\nz = 3",
                                                                {"torch"})


def test_api_reference_lists_every_public_module():
    """docs/api.rst generates a page per module listed there (each page lists the
    module's __all__): every submodule that bpfast exports by name is listed, so a new
    public module cannot be left out of the reference."""
    bp = pytest.importorskip("bpfast")
    api = DOCS / "api.rst"
    if not api.exists():
        pytest.skip("no docs/ beside this tests/ directory")
    listed = set(re.findall(r"^\s+(bpfast(?:\.\w+)*)\s*$", api.read_text(), re.MULTILINE))
    exported = {f"bpfast.{name}" for name in bp.__all__
                if type(getattr(bp, name)).__name__ == "module"}
    assert "bpfast" in listed
    assert exported - listed == set()


def test_readme_is_a_front_page_whose_links_lead_somewhere():
    """README.md stays a front page (under 10,000 characters: the rest belongs in
    docs/), and each of its relative links names a file of the repository, or a docs
    page that conf.py knows is still to come from another branch."""
    readme = ROOT / "README.md"
    conf = DOCS / "conf.py"
    if not conf.exists():
        pytest.skip("no docs/ beside this tests/ directory")
    text = readme.read_text(encoding="utf-8")
    assert len(text) < 10_000
    tree = ast.parse(conf.read_text(encoding="utf-8"))
    [pages] = [ast.literal_eval(node.value) for node in tree.body
               if isinstance(node, ast.Assign)
               and getattr(node.targets[0], "id", None) == "PAGES_FROM_OTHER_BRANCHES"]
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert links
    broken = [link for link in links if not (ROOT / link).exists()
              and not (link.startswith("docs/") and pathlib.Path(link).stem in pages)]
    assert broken == []
