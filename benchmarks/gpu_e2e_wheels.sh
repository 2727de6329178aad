#!/usr/bin/env bash
# Fetches, here, the wheels of the packages jaxserve needs that the GPU image lacks (its
# python3 is CPython 3.12 with jax, flax, transformers, torch, aiohttp, ...), into .whl/
# at the repo root, which git ignores through .git/info/exclude. The device call then
# names ".whl" in carry and benchmarks/gpu_e2e.sh installs them with pip --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
platforms=""
for n in 17 24 27 28 31 34 35; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp $platforms --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 gguf==0.19.0 llguidance==1.9.1
ls -la .whl
