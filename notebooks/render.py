"""Runs the notebooks top to bottom with nbclient, and strips their outputs for git.

    python notebooks/render.py                  # execute both into notebooks/rendered/
    python notebooks/render.py --strip          # clear outputs and counts in place (for git)

The notebooks in git carry no outputs; `make notebooks` writes executed copies to
notebooks/rendered/ (not committed) for publishing. `JAXSERVE_NOTEBOOK_SIZE` (small | full)
picks the sizes; the tests execute both with `small` on the CPU (tests/notebooks/).
"""

from __future__ import annotations

import argparse
import os
import pathlib

import nbformat

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = ("colab_tpu_quickstart.ipynb", "throughput_experiments.ipynb")


def execute(path: str | os.PathLike, *, env: dict[str, str] | None = None,
            cell_timeout: int = 600) -> nbformat.NotebookNode:
    """The notebook at `path` executed in a fresh python3 kernel, run in its own folder;
    `env` is the kernel's environment (default: this process's). Raises on a failing cell."""
    from nbclient import NotebookClient

    path = pathlib.Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=cell_timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=dict(os.environ if env is None else env))
    return notebook


def strip(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Outputs, execution counts and per-cell run metadata removed, in place."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    return notebook


def is_stripped(notebook: nbformat.NotebookNode) -> bool:
    return all(not cell.get("outputs") and cell.get("execution_count") is None
               and "execution" not in cell.metadata
               for cell in notebook.cells if cell.cell_type == "code")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=[NOTEBOOKS_DIR / n for n in NOTEBOOKS])
    parser.add_argument("--strip", action="store_true", help="clear outputs in place instead")
    parser.add_argument("--out", default=NOTEBOOKS_DIR / "rendered",
                        help="folder for the executed copies")
    parser.add_argument("--cell-timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    for path in map(pathlib.Path, args.notebooks):
        if args.strip:
            nbformat.write(strip(nbformat.read(path, as_version=4)), path)
            print(f"stripped {path}")
            continue
        out = pathlib.Path(args.out) / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(execute(path, cell_timeout=args.cell_timeout), out)
        print(f"rendered {path} -> {out}")


if __name__ == "__main__":
    main()
