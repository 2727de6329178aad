"""Helpers the benchmark scripts share: percentiles, the one-table printer, JSON and PNG output.

Scripts in benchmarks/ import this module as a sibling (`python benchmarks/x.py` puts the
directory on sys.path). matplotlib is imported only when a plot is asked for, so the
benchmarks run without it; `save_plot` says clearly when it is missing.
"""

from __future__ import annotations

import json
import sys

import numpy as np

PERCENTILES = (50, 90, 99)


def percentiles(values, pcts=PERCENTILES) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ..., "mean": ...}; NaN for an empty list."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        return {**{f"p{p}": float("nan") for p in pcts}, "mean": float("nan")}
    return {**{f"p{p}": float(np.percentile(array, p)) for p in pcts},
            "mean": float(array.mean())}


def print_table(header: list[str], rows: list[list], markdown: bool = False) -> str:
    """Prints one table (aligned text, or markdown rows with `markdown`) and returns it."""
    cells = [[_cell(v) for v in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
    else:
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
                  for i, h in enumerate(header)]
        def line(row):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        lines = [line(header)] + [line(row) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _cell(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)


def save_plot(path: str | None, draw) -> bool:
    """Calls `draw(ax)` on a fresh figure and saves it to `path` (PNG). Returns False, with
    a message on stderr, when matplotlib is not installed."""
    if not path:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed; no plot written "
              "(pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)
    return True


def random_token_ids(rng: np.random.Generator, allowed: np.ndarray, n: int) -> list[int]:
    """`n` ids drawn uniformly from `allowed` (the tokenizer's non-special ids)."""
    return [int(t) for t in rng.choice(allowed, size=int(n))]


def allowed_ids(tokenizer) -> np.ndarray:
    return np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)


def random_lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> np.ndarray:
    """Lengths uniform in [mean * (1 - r), mean * (1 + r)], at least 1 (vLLM's random set)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def drive_engine(engine, requests, *, max_concurrency: int | None = None,
                 arrival_times=None, on_step=None) -> dict:
    """Runs (prompt_token_ids, SamplingParams) pairs through an `LLMEngine` step loop.

    A request joins when its arrival offset (seconds from the start; default 0) has passed
    and fewer than `max_concurrency` are in flight. TTFT is measured per request from its
    admission to the end of the step that produced its first token. `on_step()` runs after
    every step. Returns ttft_s (input order), elapsed_s and output_tokens.
    """
    import time

    arrival_times = list(arrival_times) if arrival_times is not None else [0.0] * len(requests)
    limit = max_concurrency or len(requests)
    added, ttft, next_index, output_tokens = {}, {}, 0, 0
    in_flight: set[str] = set()
    start = time.perf_counter()
    while next_index < len(requests) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while (next_index < len(requests) and len(in_flight) < limit
               and arrival_times[next_index] <= now):
            ids, params = requests[next_index]
            request_id = engine.add_request(f"r{next_index}", list(ids), params)
            added[request_id] = time.perf_counter()
            in_flight.add(request_id)
            next_index += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(arrival_times[next_index] - now, 0.05)))
            continue
        outputs = engine.step()
        stamp = time.perf_counter()
        for output in outputs:
            if output.request_id not in ttft and output.outputs[0].token_ids:
                ttft[output.request_id] = stamp - added[output.request_id]
            if output.finished:
                in_flight.discard(output.request_id)
                output_tokens += len(output.outputs[0].token_ids)
        if on_step is not None:
            on_step()
    elapsed = time.perf_counter() - start
    return {"ttft_s": [ttft.get(f"r{i}", float("nan")) for i in range(len(requests))],
            "elapsed_s": elapsed, "output_tokens": output_tokens}
