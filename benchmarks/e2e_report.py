"""The end-to-end run's throughput and serving tables, from the JSON its steps wrote.

    python benchmarks/e2e_report.py RESULTS_DIR OUT_DIR

Reads RESULTS_DIR/{throughput,hf}_MODEL_INxOUT.json (benchmark_throughput.py) and
serving_MODEL_cN.json (benchmark_serving.py); writes OUT_DIR/throughput.md (jaxserve against
HF static batching, the ratio, compilations after warm-up, start-up and compile time),
OUT_DIR/serving.md (TTFT / TPOT p50 / p99 per client count) and OUT_DIR/results.json (every
input, merged). A missing file (a step that failed or ran out of time) is a row of n/a.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

from bench_common import print_table, write_json

NA = float("nan")


def _load(results_dir: str) -> dict[str, dict]:
    loaded = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            loaded[os.path.basename(path)[:-5]] = json.load(f)
    return loaded


def throughput_rows(results: dict[str, dict]) -> list[list]:
    keys = {m.group(1, 2) for k in results
            if (m := re.fullmatch(r"(?:throughput|hf)_(.+)_(\d+x\d+)", k))}
    rows = []
    for model, workload in sorted(keys):
        ours = results.get(f"throughput_{model}_{workload}", {})
        hf = results.get(f"hf_{model}_{workload}", {})
        stats = ours.get("backend_stats", {})
        ours_tps = ours.get("output_tokens_per_second", NA)
        hf_tps = hf.get("output_tokens_per_second", NA)
        rows.append([model, workload.replace("x", " in / ") + " out", ours.get("num_requests", NA),
                     ours_tps, ours.get("tokens_per_second", NA), hf_tps,
                     ours_tps / hf_tps if hf_tps == hf_tps and hf_tps else NA,
                     stats.get("num_compilations_while_timed", NA), stats.get("startup_s", NA),
                     stats.get("all_compiled_s", NA), hf.get("num_requests", NA)])
    return rows


def serving_rows(results: dict[str, dict]) -> list[list]:
    rows = []
    for key in sorted(results, key=lambda k: (k.rsplit("_c", 1)[0], int(k.rsplit("_c", 1)[1]))
                      if k.startswith("serving_") else ("", 0)):
        if not key.startswith("serving_"):
            continue
        model, clients = key[len("serving_"):].rsplit("_c", 1)
        r = results[key]
        rows.append([model, int(clients), f"{r['completed']}/{r['failed']}",
                     r["ttft_ms"]["p50"], r["ttft_ms"]["p99"], r["tpot_ms"]["p50"],
                     r["tpot_ms"]["p99"], r["output_throughput"]])
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results_dir", help="the JSON files of the run's steps")
    p.add_argument("out_dir", help="where the tables go")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    results_dir, out_dir = args.results_dir, args.out_dir
    results = _load(results_dir)
    throughput = print_table(
        ["model", "workload", "requests", "jaxserve out tok/s", "jaxserve total tok/s",
         "HF out tok/s", "ratio", "compilations after warm-up", "start-up s",
         "all compiled s", "HF requests"], throughput_rows(results), markdown=True)
    serving = print_table(
        ["model", "clients", "completed/failed", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
         "TPOT p99 ms", "out tok/s"], serving_rows(results), markdown=True)
    with open(os.path.join(out_dir, "throughput.md"), "w") as f:
        f.write("### Offline throughput (random, dummy weights, bf16; HF: static batches, "
                f"SDPA)\n\n{throughput}\n")
    with open(os.path.join(out_dir, "serving.md"), "w") as f:
        f.write(f"### Serving (random prompts, streamed, all at once per client)\n\n{serving}\n")
    write_json(os.path.join(out_dir, "results.json"), results)


if __name__ == "__main__":
    main()
