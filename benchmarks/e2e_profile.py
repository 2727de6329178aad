"""A `jax.profiler` trace of engine steps, summarised as text: where the device time went.

`summarize_trace(trace_dir, num_steps)` reads the trace's XSpace (`jax.profiler.ProfileData`,
no TensorBoard) and takes the device's op events: the kernels on a GPU's streams, or on a
CPU the XLA thunks (host events carrying an `hlo_op`). Each goes to one CATEGORIES entry by
its program (`hlo_module`: the runner's jit_sample is the sampler) and its op or kernel name;
"host gaps" is the time within the traced window when no op ran (the device waiting for the
host between and within steps). Values are per step; `top` lists the costliest kernels with
their category, so a name the rules miss shows up.
"""

from __future__ import annotations

import glob
import os
import re
from collections import defaultdict

CATEGORIES = ("attention", "GEMMs", "sampler", "KV write", "other", "host gaps")
# (category, pattern over "module op name", lowercased): the first match wins.
_RULES = (
    ("sampler", re.compile(r"jit_sample|jit_prompt_logprobs")),
    ("attention", re.compile(r"attention|paged|flash|mha|softmax")),
    ("KV write", re.compile(r"scatter|set_rows|set_slots|write_kv|dynamic[-_]update")),
    ("GEMMs", re.compile(r"gemm|matmul|cublas|cutlass|nvjet|xmma|\bdot|dot[._-]|ynn_fusion|"
                         r"onednn|triton_gemm")),
)


def categorize(module: str, op: str, name: str) -> str:
    text = f"{module} {op} {name}".lower()
    return next((category for category, rule in _RULES if rule.search(text)), "other")


def _trace_file(trace_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    return files[-1]


def _op_events(profile) -> list[tuple[float, float, str, str, str]]:
    """(start ns, end ns, module, op, name) of every device op of the trace."""
    def collect(lines, need_op: bool):
        events = []
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                if need_op and "hlo_op" not in stats:
                    continue
                start = float(event.start_ns)
                events.append((start, start + float(event.duration_ns),
                               str(stats.get("hlo_module", "")), str(stats.get("hlo_op", "")),
                               event.name))
        return events

    devices = [plane for plane in profile.planes if plane.name.startswith("/device:")]
    if devices:  # GPU/TPU: every kernel and copy on the device's streams
        lines = [line for plane in devices for line in plane.lines
                 if not line.name.lower().startswith(("xla modules", "xla ops", "steps"))]
        return collect(lines, need_op=False)
    hosts = [plane for plane in profile.planes if plane.name.startswith("/host:CPU")]
    return collect([line for plane in hosts for line in plane.lines], need_op=True)


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize_trace(trace_dir: str, num_steps: int, *, top: int = 12) -> dict:
    """{"window_ms", "per_step_ms": {category: ms}, "pct": {category: %}, "top": [...]}."""
    from jax.profiler import ProfileData

    events = _op_events(ProfileData.from_file(_trace_file(trace_dir)))
    if not events:
        raise ValueError(f"the trace in {trace_dir} holds no device op events")
    window = max(e[1] for e in events) - min(e[0] for e in events)
    busy = _union_ns([(e[0], e[1]) for e in events])
    per_category: dict[str, float] = defaultdict(float)
    per_kernel: dict[tuple[str, str], float] = defaultdict(float)
    for start, stop, module, op, name in events:
        category = categorize(module, op, name)
        per_category[category] += stop - start
        per_kernel[(category, name)] += stop - start
    # Overlapping ops (streams, threads) count once: each category keeps its share of busy.
    total_ops = sum(per_category.values())
    per_step = {c: busy * per_category.get(c, 0.0) / total_ops / num_steps / 1e6
                for c in CATEGORIES[:-1]}
    per_step["host gaps"] = (window - busy) / num_steps / 1e6
    step_ms = window / num_steps / 1e6
    kernels = sorted(per_kernel.items(), key=lambda item: -item[1])[:top]
    return {"num_steps": num_steps, "num_events": len(events), "window_ms": window / 1e6,
            "step_ms": step_ms, "per_step_ms": per_step,
            "pct": {c: 100.0 * v / step_ms for c, v in per_step.items()},
            "top": [{"category": c, "kernel": n, "ms_per_step": t / num_steps / 1e6}
                    for (c, n), t in kernels]}
