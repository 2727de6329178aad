"""Structured outputs: what a JSON schema costs against the same requests unconstrained.

One `LLM` runs `--num-prompts` requests at once (greedy, `--max-tokens` each) four ways:
unconstrained with EOS ignored (every request runs its full length), constrained by a
4-property JSON schema (compact: no free whitespace), unconstrained again with each request
stopped at its constrained output's length ("length-matched": the same batch sizes step by
step, so the ratio to it is the constraint's own cost, not the shorter outputs' emptier
batches), and the two halves mixed. The constrained and length-matched runs alternate
`--repeats` times (the best of each counts: the machine's noise only slows a run). Reported:
output tokens/s of each, both ratios, the mask work of the fastest constrained run
(`MaskTimers`: the fill's time on the step path and the engine thread's CPU in it, at the
widest batch and over all steps, how many fills ran while their step's forward did, and
the matchers' advance per step), and the compile time of a 20-property schema, fresh and
cached. Prints two tables.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench_common import print_table, write_json

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "color", "tags"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 6}}}}


def schema_with(num_properties: int) -> dict:
    kinds = ({"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 16},
             {"type": "boolean"}, {"enum": ["a", "b", "c"]})
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(num_properties)}
    return {"type": "object", "properties": props, "required": sorted(props),
            "additionalProperties": False}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a checkpoint with a fast tokenizer")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating constrained / length-matched runs (the best counts)")
    p.add_argument("--fill", choices=("auto", "serial", "parallel"), default="auto",
                   help="mask rows filled on the engine thread or in llguidance's pool "
                        "(auto: the engine's choice, serial on a CPU backend)")
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


class MaskTimers:
    """Wraps the engine's mask work to record, per step that fills rows: the fill's wall
    time on the engine thread (what the step waits for), that thread's CPU time in it (the
    fill itself where rows are filled on the engine thread; with llguidance's pool its
    workers' CPU is not in it), the rows, whether the step's forward was launched and
    running meanwhile (its sampler not yet), and the matchers' advance by each step's
    tokens (`LLMEngine._advance_grammars`, also on the step path)."""

    def __init__(self, engine):
        self.fills: list[tuple[float, float, int, bool]] = []  # (wall, cpu, rows, overlapped)
        self.advances: list[float] = []
        self._forward_running = False
        so, runner = engine.structured_outputs, engine.runner
        prepare_step, advance = so.prepare_step, engine._advance_grammars
        dispatch, sample = runner.dispatch, runner.sample

        def timed_prepare_step(out):
            wall, cpu = time.perf_counter(), time.thread_time()
            result = prepare_step(out)
            if result.grammar_bitmask is not None:
                self.fills.append((time.perf_counter() - wall, time.thread_time() - cpu,
                                   len(result.grammar_bitmask), self._forward_running))
            return result

        def timed_advance(updates):
            start = time.perf_counter()
            result = advance(updates)
            self.advances.append(time.perf_counter() - start)
            return result

        def flagged_dispatch(*args, defer_sampling=False, **kwargs):
            self._forward_running = defer_sampling
            return dispatch(*args, defer_sampling=defer_sampling, **kwargs)

        def flagged_sample(*args):
            self._forward_running = False
            return sample(*args)

        so.prepare_step, engine._advance_grammars = timed_prepare_step, timed_advance
        runner.dispatch, runner.sample = flagged_dispatch, flagged_sample

    def clear(self) -> None:
        self.fills.clear()
        self.advances.clear()

    def summary(self) -> dict:
        fills = np.array([f[:3] for f in self.fills]).reshape(-1, 3)  # [n, (wall, cpu, rows)]
        widest = int(fills[:, 2].max()) if len(fills) else 0
        at_widest = fills[fills[:, 2] == widest] * [1e3, 1e3, 1]
        ms = lambda x, q: float(np.percentile(x, q)) if len(x) else None  # noqa: E731
        return dict(widest_batch=widest, num_fills=len(fills),
                    num_fills_overlapped=sum(f[3] for f in self.fills),
                    fill_wall_ms_p50=ms(fills[:, 0] * 1e3, 50),
                    fill_wall_ms_p99=ms(fills[:, 0] * 1e3, 99),
                    fill_wall_ms_widest_p50=ms(at_widest[:, 0], 50),
                    fill_cpu_ms_widest_p50=ms(at_widest[:, 1], 50),
                    advance_ms_p50=ms(np.array(self.advances) * 1e3, 50))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxserve import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, progress=False,
              background_compilation=False)
    engine = llm.llm_engine
    if args.fill != "auto":  # the engine's private switch, for this comparison only
        engine.structured_outputs._parallel_fill = args.fill == "parallel"
    prompts = [f"Person {i}: describe them." for i in range(args.num_prompts)]
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                 structured_outputs=StructuredOutputsParams(
                                     json=SCHEMA, disable_any_whitespace=True))
    runs = {"unconstrained": [free] * len(prompts), "json_schema": [constrained] * len(prompts),
            "mixed (half each)": [free, constrained] * (len(prompts) // 2)}
    llm.generate(prompts[:4], [free, constrained] * 2, use_tqdm=False)  # warm-up
    timers = MaskTimers(engine)
    results, rows, mask = {}, [], None

    def run(name: str, params: list) -> list:
        nonlocal mask
        timers.clear()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if name == "json_schema" and (mask is None or seconds < results[name]["seconds"]):
            mask = timers.summary()  # the fastest constrained run's
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        valid = sum(1 for o, p in zip(outputs, params) if p.structured_outputs is not None
                    and o.outputs[0].finish_reason == "stop"
                    and json.loads(o.outputs[0].text) is not None)
        if name not in results or tokens / seconds > results[name]["tok_s"]:
            results[name] = dict(seconds=seconds, output_tokens=tokens, tok_s=tokens / seconds,
                                 valid_json=valid)
        return outputs

    run("unconstrained", runs["unconstrained"])
    lengths = [len(o.outputs[0].token_ids) for o in run("json_schema", runs["json_schema"])]
    matched = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    run("unconstrained, length-matched", matched)
    for _ in range(args.repeats - 1):
        run("json_schema", runs["json_schema"])
        run("unconstrained, length-matched", matched)
    run("mixed (half each)", runs["mixed (half each)"])
    for name, r in results.items():
        rows.append([name, len(prompts), r["output_tokens"], round(r["seconds"], 2),
                     round(r["tok_s"], 1), r["valid_json"]])
    ratio = results["json_schema"]["tok_s"] / results["unconstrained"]["tok_s"]
    ratio_matched = (results["json_schema"]["tok_s"]
                     / results["unconstrained, length-matched"]["tok_s"])
    so = engine.structured_outputs
    so.compile(StructuredOutputsParams(json=schema_with(3)))  # the vocabulary view, built once
    big = StructuredOutputsParams(json=schema_with(20))
    start = time.perf_counter()
    so.compile(big)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    so.compile(big)
    cached = time.perf_counter() - start
    print_table(["run", "requests", "output tokens", "seconds", "output tok/s",
                 "valid JSON outputs"], rows)
    print_table(["measure", "value"], [
        ["json_schema / unconstrained output tok/s", round(ratio, 3)],
        ["json_schema / length-matched unconstrained output tok/s", round(ratio_matched, 3)],
        ["fill mode", "llguidance's pool" if so._parallel_fill else "serial, engine thread"],
        [f"mask fill on the step path at B = {mask['widest_batch']}, p50 ms (wall)",
         _ms(mask["fill_wall_ms_widest_p50"])],
        [f"  engine thread's CPU in it at B = {mask['widest_batch']}, p50 ms",
         _ms(mask["fill_cpu_ms_widest_p50"])],
        ["mask fill, all steps, p50 / p99 ms (wall)",
         f"{_ms(mask['fill_wall_ms_p50'])} / {_ms(mask['fill_wall_ms_p99'])}"],
        ["fills made while their step's forward ran",
         f"{mask['num_fills_overlapped']} of {mask['num_fills']}"],
        ["matchers' advance by a step's tokens, p50 ms", _ms(mask["advance_ms_p50"])],
        ["20-property schema compile, fresh ms", round(fresh * 1e3, 2)],
        ["20-property schema compile, cached ms", round(cached * 1e3, 4)],
    ])
    results.update(ratio=ratio, ratio_length_matched=ratio_matched, **mask,
                   parallel_fill=so._parallel_fill, compile_fresh_ms=fresh * 1e3,
                   compile_cached_ms=cached * 1e3)
    write_json(args.output_json, results)
    return results


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
