"""jaxserve.core (and what it imports) stays pure Python: importing it never loads jax."""

import subprocess
import sys

import pytest

CORE_MODULES = ["jaxserve.core", "jaxserve.core.block_pool", "jaxserve.core.block_hash",
                "jaxserve.core.kv_cache_manager", "jaxserve.core.request_queue",
                "jaxserve.core.scheduler", "jaxserve.core.scheduler_output",
                "jaxserve.core.stop_rules", "jaxserve.request",
                "jaxserve.sampling_params", "jaxserve.config"]


@pytest.mark.parametrize("module", CORE_MODULES)
def test_importing_a_core_module_in_a_fresh_interpreter_does_not_import_jax(module):
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('jax', 'jaxlib', 'flax', 'transformers')\n"
            "               if m in sys.modules)\n"
            "assert 'jax' not in sys.modules, heavy\n"
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
