"""jaxserve against its peers on one workload: medians of interleaved throughput runs.

    python benchmarks/compare_throughput.py --model DIR --repeats 3 [benchmark_throughput flags]

Each configuration (jaxserve; hf at each `--hf-batch-sizes`; hf-cb; vllm at each of
`--vllm-dtypes` x `--vllm-binds`) is one `benchmark_throughput.py` subprocess per repeat,
round-robin so that a noisy minute hits every backend alike. Unknown flags (workload,
budgets) go to every run unchanged. An optional backend that is missing (exit 2: no vLLM venv, no continuous batching
in transformers) is skipped with its message. Prints medians and jaxserve's ratio to the
best hf, to hf-cb and to vllm at its best setting (the issue's target: >= 1.0x vllm).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from bench_common import print_table, save_plot, write_json

HERE = pathlib.Path(__file__).resolve().parent


def configs(args) -> dict[str, list[str]]:
    """Label -> the backend flags of one configuration."""
    out: dict[str, list[str]] = {}
    for backend in args.backends:
        if backend == "hf":
            for b in args.hf_batch_sizes:
                out[f"hf batch {b}"] = ["--backend", "hf", "--hf-max-batch-size", str(b)]
        elif backend == "vllm":
            for dtype in args.vllm_dtypes:
                for bind in args.vllm_binds:
                    label = f"vllm {dtype}" + ("" if bind == "auto" else f" bind {bind}")
                    out[label] = ["--backend", "vllm", "--vllm-dtype", dtype,
                                  "--vllm-omp-threads-bind", bind]
        elif backend == "jaxserve" and args.jaxserve_dtypes:
            for dtype in args.jaxserve_dtypes:
                out[f"jaxserve {dtype}"] = ["--backend", "jaxserve", "--dtype", dtype]
        else:
            out[backend] = ["--backend", backend]
    return out


def run_once(flags: list[str], common: list[str], work: pathlib.Path, tag: str):
    """(results dict, None) or (None, why it was skipped or failed)."""
    out = work / f"{tag}.json"
    command = [sys.executable, str(HERE / "benchmark_throughput.py"), *common, *flags,
               "--output-json", str(out)]  # a configuration's flags win over common ones
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode == 2:  # an optional backend is missing: its own message
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        return None, "skipped: " + (lines[-1][len("error: "):] if lines else done.stderr[-300:])
    if done.returncode != 0:
        return None, f"failed (code {done.returncode}): {done.stderr.strip()[-500:]}"
    return json.loads(out.read_text()), None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["jaxserve", "hf", "hf-cb", "vllm"],
                   choices=["jaxserve", "hf", "hf-cb", "vllm"])
    p.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[64])
    p.add_argument("--vllm-dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"])
    p.add_argument("--jaxserve-dtypes", nargs="+", default=None,
                   choices=["float32", "bfloat16"],
                   help="one jaxserve configuration per dtype (default: the common --dtype)")
    p.add_argument("--vllm-binds", nargs="+", default=["auto"],
                   help="VLLM_CPU_OMP_THREADS_BIND values to try (e.g. auto 0-1)")
    p.add_argument("--output-json")
    p.add_argument("--plot", default=None,
                   help="PNG: median output tokens/s of each configuration, runs as dots")
    args, common = p.parse_known_args(argv)
    common = ["--model", args.model, *common]
    todo = configs(args)
    runs: dict[str, list[dict]] = {label: [] for label in todo}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        for repeat in range(args.repeats):
            for i, (label, flags) in enumerate(todo.items()):
                if label in notes:
                    continue  # skipped or failed once: not tried again
                result, note = run_once(flags, common, pathlib.Path(tmp), f"{i}-{repeat}")
                if note:
                    notes[label] = note
                    print(f"{label}: {note}", file=sys.stderr, flush=True)
                else:
                    runs[label].append(result)
                    print(f"{label} run {repeat + 1}: "
                          f"{result['output_tokens_per_second']:.1f} output tok/s",
                          file=sys.stderr, flush=True)

    def median(label, key):
        return statistics.median(r[key] for r in runs[label])

    rows, medians = [], {}
    for label in todo:
        if not runs[label]:
            rows.append([label, notes[label].split(":")[0], "", "", "", "", ""])
            continue
        medians[label] = median(label, "output_tokens_per_second")
        startups = [r["startup_s"] for r in runs[label] if r.get("startup_s") is not None]
        rows.append([label, median(label, "requests_per_second"), medians[label],
                     median(label, "tokens_per_second"), median(label, "elapsed_time"),
                     statistics.median(startups) if startups else float("nan"),
                     ", ".join(f"{r['output_tokens_per_second']:.1f}" for r in runs[label])])
    print_table(["backend", "requests/s", "output tok/s", "total tok/s", "elapsed s",
                 "start-up s", "runs, output tok/s"], rows)
    for label, note in notes.items():
        print(f"{label}: {note}")
    ratios = {}
    ours = {label: m for label, m in medians.items() if label.startswith("jaxserve")}
    for peer in ("hf batch", "hf-cb", "vllm"):  # jaxserve's best against each peer's best
        peers = {label: m for label, m in medians.items() if label.startswith(peer)}
        if ours and peers:
            best, mine = max(peers, key=peers.get), max(ours, key=ours.get)
            ratios[peer] = {"best": best, "jaxserve": mine,
                            "ratio": medians[mine] / peers[best]}
            print(f"{mine} / {best} = {ratios[peer]['ratio']:.2f}x in output tokens/s "
                  "(medians)")
    results = {"medians_output_tok_s": medians, "ratios": ratios, "notes": notes,
               "runs": runs, "common_args": common, "repeats": args.repeats}
    write_json(args.output_json, results)

    def draw(ax):
        labels = [label for label in todo if runs[label]]
        ax.bar(range(len(labels)), [medians[label] for label in labels], color="#8fb3d9")
        for i, label in enumerate(labels):
            ax.plot([i] * len(runs[label]),
                    [r["output_tokens_per_second"] for r in runs[label]], "k.")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_ylabel("output tokens/s (median, runs as dots)")
        ax.set_title("offline throughput, same model and requests")

    save_plot(args.plot, draw)
    return results


if __name__ == "__main__":
    main()
