"""`make bench`: runs the CPU benchmark suite on the qwen2-40m random checkpoint and
rewrites their sections of benchmarks/RESULTS.md in place.

Each benchmark's section sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`
markers (appended at the end the first time) and holds the machine, the command and the
table the script printed. `--only NAME ...` runs a subset; `--dry-run` only prints commands.
The throughput comparisons take the vLLM venv from benchmarks/peers/setup_vllm_cpu.sh and
skip vLLM, with a note in their section, when it is missing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import shlex
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
TITLES = {
    "serving": "Online serving: `benchmark_serving.py` against `jaxserve serve` (CPU)",
    "prefix_caching": "Prefix caching on vs off: `benchmark_prefix_caching.py` (CPU)",
    "kv_memory": "KV cache utilization and concurrency: `benchmark_kv_memory.py`",
    "compilation": "Compilations and padding: `benchmark_compilation.py` (CPU)",
    "startup": "Start-up to the first answer, cold and warm: `benchmark_startup.py` (CPU)",
    "throughput": "Offline throughput vs hf, hf-cb and vLLM: `compare_throughput.py` (CPU)",
    "throughput_sharegpt": "Offline throughput, ShareGPT-like lengths: `compare_throughput.py`",
    "step_breakdown": "Step time at batch 64: `benchmark_step_breakdown.py` (CPU)",
}
# The throughput workload (RESULTS.md's first CPU measurement used the same).
THROUGHPUT = ["--repeats", "3", "--num-prompts", "128", "--dtype", "float32", "--seed", "0",
              "--hf-batch-sizes", "64", "--jaxserve-dtypes", "float32", "bfloat16",
              "--vllm-dtypes", "float32", "bfloat16",
              "--vllm-binds", "auto", "0-1"]  # vLLM's default binding idles a core here


def commands(ckpt: str, jaxserve: str) -> dict[str, list[str]]:
    """The benchmark command lines; `ckpt` is the qwen2-40m checkpoint directory."""
    return {
        "serving": ["benchmark_serving.py", "--model", ckpt, "--num-prompts", "64",
                    "--input-len", "128", "--output-len", "64", "--random-range-ratio", "0.5",
                    "--request-rate", "4", "--goodput", "ttft:1000", "tpot:100", "--launch",
                    f"{jaxserve} serve {ckpt} --port 0 --max-num-seqs 32 "
                    "--max-num-batched-tokens 512"],
        "prefix_caching": ["benchmark_prefix_caching.py", "--model", ckpt],
        "kv_memory": ["benchmark_kv_memory.py"],
        "compilation": ["benchmark_compilation.py", "--model", ckpt],
        "startup": ["benchmark_startup.py", "--llm-model", ckpt],
        "throughput": ["compare_throughput.py", "--model", ckpt, *THROUGHPUT, "--input-len",
                       "128", "--output-len", "128", "--random-range-ratio", "0.5"],
        "throughput_sharegpt": ["compare_throughput.py", "--model", ckpt, *THROUGHPUT,
                                "--dataset-name", "sharegpt-like"],
        "step_breakdown": ["benchmark_step_breakdown.py", "--model", ckpt, "--batch-size", "64",
                           "--input-len", "128", "--output-len", "128"],
    }


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the section NAME's body replaced (or appended if it has none)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        return head + block + tail
    return text.rstrip("\n") + "\n\n" + block


def machine() -> str:
    import jax

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
            f"{platform.python_implementation()} {platform.python_version()}, "
            f"jax {jax.__version__} on {jax.default_backend()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="/tmp/jaxserve-bench")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--only", nargs="+", choices=sorted(TITLES), default=sorted(TITLES))
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    work = pathlib.Path(args.work_dir)
    ckpt = work / "qwen2-40m"
    jaxserve = str(pathlib.Path(sys.executable).with_name("jaxserve"))
    todo = {k: v for k, v in commands(str(ckpt), jaxserve).items() if k in args.only}
    if args.dry_run:
        for argv_ in todo.values():
            print(shlex.join([sys.executable, str(HERE / argv_[0]), *argv_[1:]]))
        return 0
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "make_random_checkpoint.py"), "--preset",
                        "qwen2-40m", str(ckpt)], check=True)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    results = pathlib.Path(args.results)
    for name, argv_ in todo.items():
        json_path = work / f"{name}.json"
        full = [sys.executable, str(HERE / argv_[0]), *argv_[1:], "--output-json", str(json_path)]
        print(f"== {name}: {shlex.join(full)}", flush=True)
        done = subprocess.run(full, env=env, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(done.stdout)
        if done.returncode != 0:
            print(f"{name} failed with code {done.returncode}; its section is unchanged")
            continue
        shown = shlex.join(["python", f"benchmarks/{argv_[0]}", *argv_[1:]])
        # Double quotes, so that $CKPT expands when the line is pasted into a shell.
        shown = shown.replace(str(ckpt), "$CKPT").replace(jaxserve, "jaxserve").replace("'", '"')
        ckpt_note = (" `$CKPT` is `make_random_checkpoint.py --preset qwen2-40m` (float32)."
                     if "$CKPT" in shown else "")
        body = (f"## {TITLES[name]}\n\n"
                f"Generated by `make bench` on {datetime.date.today()} ({machine()})."
                f"{ckpt_note} Full results: `{json_path.name}` in the work directory.\n\n"
                f"```\nJAX_PLATFORMS=cpu {shown}\n```\n\n```\n{done.stdout.rstrip()}\n```\n")
        results.write_text(replace_section(results.read_text(), name, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
