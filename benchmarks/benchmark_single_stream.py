"""One stream's decode time per token, and where it goes: host parts and device ops.

    python benchmarks/benchmark_single_stream.py [--model PATH] [--quantization none]
        [--output-len 128] [--profile-steps 32]

Loads `--model` (default: the default model, jaxserve serve's) with `LLM`, every bucket
compiled, runs an unmeasured warm-up request, then decodes one greedy request of
`--output-len` tokens (EOS ignored) with `step_timers.StepTimers` around the engine's calls:
ms/token and its host parts (scheduler, input prep, output, other) and the device part
(launch + wait), and the process's CPU time per step (all threads; steadier than the wall
time on a shared machine). Then `--profile-steps` more decode steps run under the JAX
profiler, and the device ops of those steps (XLA fusions and the native kernels, named by their
custom-call target and operand shapes) are summed per step: which op kinds take the time.
The profiler slows a step down; its per-op times are for shares, the first table is the
measurement.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import numpy as np

from bench_common import print_table, write_json
from step_timers import PARTS, StepTimers, summarize


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    p.add_argument("--quantization", default=None,
                   help="LLM quantization (None: as stored; 'none': every weight float)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--profile-steps", type=int, default=32, help="0: no per-op table")
    p.add_argument("--top-ops", type=int, default=20, help="rows of the per-op table")
    p.add_argument("--output-json")
    return p.parse_args(argv)


def op_kinds(hlo_text: str) -> dict[str, str]:
    """instruction name -> its kind: a custom call's target and operand shapes (the
    profiler names events after instructions; fusions keep their own names)."""
    kinds = {}
    call = re.compile(r"%([\w.\-]+) = .*?custom-call\(.*?custom_call_target=\"([^\"]+)\"")
    for line in hlo_text.splitlines():
        match = call.search(line)
        if match:
            name, target = match.groups()
            layouts = line.partition("operand_layout_constraints=")[2].partition("}, api_")[0]
            shapes = [s for s in re.findall(r"\w+\[[\d,]*\]", layouts) if s != "s32[1]"]
            target = re.sub(r"^jaxserve_|__\w+$", "", target)
            kinds[name] = f"{target} {' '.join(shapes)}"
    return kinds


def profile_ops(engine, steps: int, trace_dir: str) -> tuple[list[list], float]:
    """Per-step ms of each device op kind over `steps` engine steps, and their sum."""
    import jax

    # the programs a one-stream decode step runs: the smallest buckets (names of
    # instructions repeat across programs, so only these are read)
    compiled = engine.runner.compiled
    kinds = {"forward": op_kinds(compiled._forward[min(compiled._forward)].as_text()),
             "sample": op_kinds(compiled._sample[min(
                 k for k in compiled._sample if k[0] == "greedy")].as_text())}
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            engine.step()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        args = event.get("args") or {}
        if event.get("ph") != "X" or "hlo_op" not in args:
            continue
        op, module = args["hlo_op"], args.get("hlo_module", "?").removeprefix("jit_")
        key = (module, kinds.get(module, {}).get(op) or re.sub(r"\.\d+$", "", op))
        total[key] += event["dur"] / 1e3
        count[key] += 1
    rows = [[module, kind, count[(module, kind)] / steps, ms / steps]
            for (module, kind), ms in total.most_common()]
    return rows, sum(total.values()) / steps


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxserve import LLM, SamplingParams
    from jaxserve.entrypoints.default_model import default_model_path

    model = args.model or default_model_path()
    llm = LLM(model, quantization=args.quantization, max_num_seqs=4,
              max_num_batched_tokens=max(256, args.input_len), progress=False,
              background_compilation=False)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": list(range(100, 100 + args.input_len))}
    llm.generate([prompt], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=16),
                 use_tqdm=False)
    timers = StepTimers(engine)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.output_len)
    engine.add_request("measured", prompt["prompt_token_ids"], params)
    cpu_start = time.process_time()
    while engine.has_unfinished_requests():
        timers.timed_step()
    # every thread's CPU time (the host's and the kernels'): on a shared machine the wall
    # time moves with the other load, the work per token much less
    cpu_ms = 1e3 * (time.process_time() - cpu_start) / max(1, len(timers.records))
    decode = [r for r in timers.records if r.get("num_tokens") == 1]
    s = summarize(decode)
    s["cpu_ms_per_step"] = cpu_ms
    print(f"model {os.path.basename(model)}, quantization {args.quantization or 'as stored'}: "
          f"{s['num_steps']} decode steps, {s['step_ms']:.2f} ms/token mean "
          f"(p50 {s['step_ms_p50']:.2f}), process CPU {cpu_ms:.2f} ms/step, "
          f"load average {os.getloadavg()[0]:.1f}")
    print_table(["part", "ms/token", "% of step"],
                [[p, s["parts_ms"][p], f"{s['parts_pct'][p]:.1f}%"] for p in PARTS]
                + [["step (mean)", s["step_ms"], "100%"]])
    results = {"model": model, "quantization": args.quantization, "decode": s}
    if args.profile_steps > 0:
        engine.add_request("profiled", prompt["prompt_token_ids"], SamplingParams(
            temperature=0.0, ignore_eos=True, max_tokens=args.profile_steps + 4))
        for _ in range(2):  # the prefill and a first decode step stay out of the profile
            engine.step()
        with tempfile.TemporaryDirectory() as trace_dir:
            rows, ops_ms = profile_ops(engine, args.profile_steps, trace_dir)
        while engine.has_unfinished_requests():
            engine.step()
        print(f"\ndevice ops per decode step under the profiler ({ops_ms:.2f} ms in all):")
        print_table(["program", "op", "calls/step", "ms/step"], rows[:args.top_ops])
        results["ops"] = rows
    write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    main()
