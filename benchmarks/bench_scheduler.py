"""Scheduler overhead: microseconds per schedule() + update_from_output() step.

N requests with distinct prompts are admitted and prefilled, then the benchmark times
decode steps with every request running (one token each per step; blocks fill and get
cached along the way). The runner is a dict comprehension outside the timed region, so
the numbers are the scheduler's own cost. Prints one table.

    .venv/bin/python benchmarks/bench_scheduler.py [--steps 200] [--running 32 256 1024]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.core.scheduler import Scheduler
from jaxserve.core.scheduler_output import ModelRunnerOutput
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams


def _fake_runner_output(out) -> ModelRunnerOutput:
    return ModelRunnerOutput({req_id: [len(req_id)] for req_id in out.sampling_req_ids})


def bench(num_running: int, *, num_steps: int, prompt_len: int, block_size: int,
          enable_prefix_caching: bool) -> tuple[float, float]:
    """Median (schedule, update) microseconds per decode step with `num_running` requests."""
    max_model_len = prompt_len + num_steps + 64
    blocks_per_request = -(-max_model_len // block_size)
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=max(8192, num_running), max_num_seqs=num_running,
                        max_model_len=max_model_len),
        CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
        num_blocks=1 + num_running * blocks_per_request)
    params = SamplingParams(max_tokens=None, ignore_eos=True)
    for i in range(num_running):
        prompt = [(i * 7919 + j) % 32000 for j in range(prompt_len)]
        scheduler.add_request(Request(f"req-{i}", prompt, params))
    while scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                       for r in scheduler.running.values()):
        out = scheduler.schedule()
        scheduler.update_from_output(out, _fake_runner_output(out))
    schedule_us, update_us = [], []
    gc.collect()
    for _ in range(num_steps):
        t0 = time.perf_counter()
        out = scheduler.schedule()
        t1 = time.perf_counter()
        sampled = _fake_runner_output(out)
        t2 = time.perf_counter()
        scheduler.update_from_output(out, sampled)
        t3 = time.perf_counter()
        assert len(out.num_scheduled_tokens) == num_running
        schedule_us.append((t1 - t0) * 1e6)
        update_us.append((t3 - t2) * 1e6)
    return statistics.median(schedule_us), statistics.median(update_us)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--no-prefix-caching", action="store_true")
    args = parser.parse_args()
    print(f"{'running':>8} {'schedule us':>12} {'update us':>10} {'step us':>8} {'us/request':>11}")
    for num_running in args.running:
        schedule_us, update_us = bench(num_running, num_steps=args.steps,
                                       prompt_len=args.prompt_len, block_size=args.block_size,
                                       enable_prefix_caching=not args.no_prefix_caching)
        total = schedule_us + update_us
        print(f"{num_running:>8} {schedule_us:>12.0f} {update_us:>10.0f} {total:>8.0f} "
              f"{total / num_running:>11.2f}")


if __name__ == "__main__":
    main()
