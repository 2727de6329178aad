"""The notebooks run top to bottom on the CPU at the small size, and are stored without outputs.

Each notebook executes in a fresh kernel (nbclient) with `JAXSERVE_NOTEBOOK_SIZE=small`, one
CPU device (the suite's forced device count is removed: the quickstart asks for its own) and a
per-cell timeout; a failing cell fails the test with its traceback. Both together take about
two and a half minutes on a 2-core machine, so they are marked slow; the default run checks
that every code cell parses and that every name the notebooks import or read from a jaxserve
or benchmarks/ module exists.
"""

import ast
import importlib
import importlib.util
import os
import pathlib
import sys

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
CELL_TIMEOUT_S = 240


def _render_module():
    spec = importlib.util.spec_from_file_location("notebook_render", NOTEBOOKS / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def _kernel_env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1",
           "JAXSERVE_NOTEBOOK_SIZE": "small"}
    env.pop("XLA_FLAGS", None)
    env.pop("JAXSERVE_MODEL", None)
    env.pop("JAXSERVE_NOTEBOOK_MODEL", None)
    return env


def _text(notebook) -> str:
    """Everything the code cells printed."""
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream")


@pytest.mark.parametrize("name", render.NOTEBOOKS)
def test_notebook_is_stored_valid_and_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert render.is_stripped(notebook), f"run `python notebooks/render.py --strip` on {name}"


def _code(cell) -> str:
    """A code cell's Python: IPython magics and shell lines (`%...`, `!...`) left out."""
    return "\n".join(line for line in cell.source.splitlines()
                     if not line.lstrip().startswith(("%", "!")))


def _imported_names(tree: ast.Module) -> dict[str, set[str]]:
    """module -> the names taken from it: `from m import a` takes a; `import m` then `m.b`
    takes b. Only jaxserve's modules and benchmarks/' (top-level names without a dot)."""
    aliases, used = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            used.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
                used.setdefault(a.name, set())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            used[aliases[node.value.id]].add(node.attr)
    return {m: names for m, names in used.items()
            if m.split(".")[0] == "jaxserve" or (BENCHMARKS / f"{m}.py").is_file()}


BENCHMARKS = NOTEBOOKS.parent / "benchmarks"


@pytest.mark.parametrize("name", render.NOTEBOOKS)
def test_notebook_code_parses_and_its_imports_exist(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    tree = ast.parse("\n".join(_code(c) for c in notebook.cells if c.cell_type == "code"))
    imported = _imported_names(tree)
    assert imported, "the notebook imports nothing from jaxserve or benchmarks/"
    sys.path.insert(0, str(BENCHMARKS))  # the throughput notebook's own set-up
    before = set(sys.modules)
    try:
        for module_name, names in imported.items():
            module = importlib.import_module(module_name)
            missing = sorted(n for n in names if not hasattr(module, n)
                             and importlib.util.find_spec(f"{module_name}.{n}") is None)
            assert not missing, f"{name}: {module_name} has no {missing}"
    finally:
        sys.path.remove(str(BENCHMARKS))
        for module_name in set(sys.modules) - before:
            if not module_name.startswith("jaxserve"):
                sys.modules.pop(module_name)


@pytest.mark.slow
def test_quickstart_serves_generates_and_shards_on_cpu():
    notebook = render.execute(NOTEBOOKS / "colab_tpu_quickstart.ipynb", env=_kernel_env(),
                              cell_timeout=CELL_TIMEOUT_S)
    text = _text(notebook)
    assert "not on Colab" in text
    assert "jaxserve:kv_cache_usage_perc" in text  # /metrics was read
    assert "server exit code: 0" in text  # SIGTERM stopped it cleanly
    assert "tensor_parallel_size=3" in text and "same as unsharded: False" not in text


@pytest.mark.slow
def test_throughput_experiments_sweep_and_plot_on_cpu():
    notebook = render.execute(NOTEBOOKS / "throughput_experiments.ipynb", env=_kernel_env(),
                              cell_timeout=CELL_TIMEOUT_S)
    text = _text(notebook)
    assert "size small" in text and "prefix caching, shared prefix" in text
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if "image/png" in output.get("data", {})]
    assert len(images) == 1  # the three plots, one figure
