"""`pip install jaxserve` alone (no test extras: no torch) serves a chat completion.

The test environment has far more installed than a server needs (torch, for the HF
reference, brings jinja2, which transformers' chat templates use but do not require), so a
runtime dependency missing from pyproject.toml only shows in an environment made from the
declared dependencies. This test makes one (pip, from the package registry or its cache),
and chats through `LLM` on the tiny qwen2 checkpoint there.
"""

import os
import pathlib
import subprocess
import sys
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

_CHAT = """
import sys
from jaxserve import LLM, SamplingParams
llm = LLM(sys.argv[1], max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128,
          progress=False)
out = llm.chat([{"role": "user", "content": "Hello there"}],
               SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 4, out
assert "torch" not in sys.modules
print("chatted")
"""


@pytest.mark.slow  # a virtual environment installed from scratch: minutes
def test_the_declared_dependencies_alone_serve_a_chat(engine_checkpoint, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "-q", "-e", str(REPO)],
                             capture_output=True, text=True, timeout=1500)
    assert install.returncode == 0, install.stderr[-3000:]
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert missing.returncode != 0, "torch is installed without the test extras"
    chat = subprocess.run([python, "-c", _CHAT, str(engine_checkpoint("qwen2"))],
                          capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                          | {"JAX_PLATFORMS": "cpu"})
    assert chat.returncode == 0 and "chatted" in chat.stdout, chat.stderr[-3000:]
