"""What an open dashboard page costs the engine, measured piece by piece.

End-to-end throughput with and without a subscribed page (`benchmark_serving.py
--dashboard-subscribers 1`) differs by less than a 2-core VM's run-to-run noise, so this
times the work the page adds directly, on a real engine (`--model`) after a real load:
the per-second summary event (`Dashboard.summary_event`: the step records of the last
second, the block map of the whole pool, the latency percentiles; made once a second and
shared by every open page) with the ring buffer full, the history sent when a page
connects, and the record appended each step (paid with or without a page). The summary
runs on the server's event loop and holds the GIL while it does, so its share of a second
bounds what it can take from the engine thread. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import time
import types

from bench_common import print_table, write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxserve import LLM, SamplingParams
    from jaxserve.engine.step_stats import STEP_HISTORY, StepRecord
    from jaxserve.entrypoints.openai.dashboard import Dashboard

    llm = LLM(args.model, progress=False, max_num_seqs=args.max_num_seqs)
    engine = llm.llm_engine
    llm.generate(["hello"] * args.max_num_seqs,
                 SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)
    now = time.time()
    blocks = engine.runner.num_blocks - 1

    def record(t: float) -> StepRecord:
        return StepRecord(t, 100, 64, 28, 64, 256, 64, blocks, blocks // 2, blocks // 8,
                          blocks - blocks // 2 - blocks // 8, 64, 10, 10**6, 5 * 10**5, 3,
                          15, 0.004, 0.05)

    for i in range(STEP_HISTORY):  # a full ring: the last five minutes
        engine.step_stats.append(record(now - 300 + i * 300 / STEP_HISTORY))
    dashboard = Dashboard(types.SimpleNamespace(engine=engine, stats={}))
    end = int(now)
    start = time.perf_counter()
    for _ in range(args.repeats):
        dashboard._latest = None  # made afresh each time, as each new second does
        event = dashboard.summary_event(end)
    summary_s = (time.perf_counter() - start) / args.repeats
    start = time.perf_counter()
    history = json.dumps(dashboard.history(end))
    history_s = time.perf_counter() - start
    count = 100_000
    start = time.perf_counter()
    for _ in range(count):
        engine.step_stats.append(record(now))
    append_s = (time.perf_counter() - start) / count
    results = dict(num_blocks=blocks, step_records=STEP_HISTORY, summary_ms=summary_s * 1e3,
                   summary_share_of_a_core=summary_s, event_bytes=len(event),
                   history_ms=history_s * 1e3, history_bytes=len(history),
                   record_append_us=append_s * 1e6)
    print_table(["measure", "value"], [
        ["KV blocks in the block map", blocks],
        ["step records kept (ring buffer)", STEP_HISTORY],
        ["summary event, once a second, ms", round(summary_s * 1e3, 2)],
        ["  share of one core (upper bound on the engine thread's loss)",
         f"{summary_s * 100:.2f}%"],
        ["summary event bytes", len(event)],
        ["history on a page's connect, ms", round(history_s * 1e3, 1)],
        ["step record built and appended, us per step", round(append_s * 1e6, 2)],
    ])
    write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    main()
