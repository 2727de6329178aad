"""Per-step host timings of a running `LLMEngine`, taken by wrapping its own calls.

`StepTimers(engine)` replaces a few bound methods on the engine's objects (instances only,
nothing in jaxserve changes) with `perf_counter` wrappers, and `timed_step()` runs one
`engine.step()` and records, per step, the seconds in each wrapped call plus the step's
B and T. `summarize()` folds the raw calls into the parts of a step:

    scheduler     Scheduler.schedule + Scheduler.update_from_output
    input prep    InputBatch.prepare + sampling-row gather + device put (host numpy, H2D)
    device        ModelRunner.dispatch + collect minus their host parts: launching the
                  forward and sampler programs, the wait for them, the device-to-host get
    output        the runner's ModelRunnerOutput + the engine's OutputProcessor (which
                  handles the previous step's tokens between dispatch and collect)
    other         the rest of LLMEngine.step (compilation tracking, bookkeeping)
"""

from __future__ import annotations

import time

import numpy as np

# (raw name, path of the object from the engine, method name)
WRAPPED = (
    ("schedule", "scheduler", "schedule"),
    ("update_from_output", "scheduler", "update_from_output"),
    ("prepare", "runner.batch", "prepare"),
    ("sampling_gather", "runner.batch.sampling", "gather"),
    ("device_put", "runner", "_put"),
    ("runner_output", "runner", "_runner_output"),
    ("dispatch", "runner", "dispatch"),
    ("collect", "runner", "collect"),
    ("output_processor", "output_processor", "process"),
)
PARTS = ("scheduler", "input prep", "device", "output", "other")


def _resolve(root, path: str):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


class StepTimers:
    """Wraps the engine's step calls; `records` holds one dict per `timed_step()`."""

    def __init__(self, engine):
        self.engine = engine
        self.records: list[dict] = []
        self._current: dict[str, float] = {}
        for raw, path, method in WRAPPED:
            try:
                target = _resolve(engine, path)
                original = getattr(target, method)
            except AttributeError as error:
                raise RuntimeError(
                    f"step_timers: engine.{path}.{method} is gone ({error}); update "
                    "benchmarks/step_timers.py WRAPPED to the engine's current names") from None
            setattr(target, method, self._wrap(raw, original))

    def _wrap(self, raw: str, original):
        current = self._current

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
            finally:
                current[raw] = current.get(raw, 0.0) + time.perf_counter() - start
            if raw == "schedule":
                current["num_reqs"] = result.num_reqs
                current["num_tokens"] = result.total_num_scheduled_tokens
            return result
        return timed

    def timed_step(self):
        """One `engine.step()`, recorded; returns its outputs."""
        self._current.clear()
        start = time.perf_counter()
        outputs = self.engine.step()
        record = dict(self._current, step=time.perf_counter() - start)
        self.records.append(record)
        return outputs


def parts_of(record: dict) -> dict[str, float]:
    """One step's seconds in each of PARTS (they add up to the step)."""
    get = record.get
    scheduler = get("schedule", 0.0) + get("update_from_output", 0.0)
    prep = get("prepare", 0.0) + get("sampling_gather", 0.0) + get("device_put", 0.0)
    # the step's launch and its wait: the previous step's output work runs between the two
    device = get("dispatch", 0.0) + get("collect", 0.0) - prep - get("runner_output", 0.0)
    output = get("runner_output", 0.0) + get("output_processor", 0.0)
    other = record["step"] - scheduler - prep - device - output
    return {"scheduler": scheduler, "input prep": prep, "device": device, "output": output,
            "other": other}


def summarize(records: list[dict]) -> dict:
    """Mean ms per step of each part, its % of the mean step, and the step count."""
    if not records:
        return {"num_steps": 0}
    per_part = {p: np.array([parts_of(r)[p] for r in records]) for p in PARTS}
    step = np.array([r["step"] for r in records])
    total = step.mean()
    return {"num_steps": len(records), "step_ms": 1e3 * total,
            "step_ms_p50": 1e3 * float(np.median(step)),
            "parts_ms": {p: 1e3 * float(v.mean()) for p, v in per_part.items()},
            "parts_pct": {p: 100.0 * float(v.mean()) / total for p, v in per_part.items()},
            "host_overhead_pct": 100.0 * float((per_part["scheduler"]
                                                + per_part["input prep"]).mean()) / total}
