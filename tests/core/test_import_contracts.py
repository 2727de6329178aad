"""The layers are enforced: import-linter checks pyproject's contracts (entrypoints -> engine
-> runner / tokenization -> core / model -> parallel -> config; no production module imports
jaxserve.testing; pallas_kernels never imports jaxserve)."""

import os
import subprocess
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sysconfig.get_path("scripts")) / "lint-imports"


def _lint(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([str(LINT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_package_keeps_every_import_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_import_from_a_lower_layer_to_a_higher_one_breaks_the_contract(tmp_path):
    """The same kind of layers contract on a two-module package, to show it bites."""
    package = tmp_path / "layered"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "high.py").write_text("")
    (package / "low.py").write_text("from layered import high\n")
    (tmp_path / ".importlinter").write_text(textwrap.dedent("""\
        [importlinter]
        root_package = layered
        [importlinter:contract:1]
        name = high above low
        type = layers
        layers =
            layered.high
            layered.low
        """))
    result = _lint(tmp_path)
    assert result.returncode != 0 and "layered.low -> layered.high" in result.stdout
