"""Structured outputs: what a JSON schema costs against the same requests unconstrained.

One `LLM` runs `--num-prompts` requests at once (greedy, `--max-tokens` each) four ways:
unconstrained with EOS ignored (every request runs its full length), constrained by a
4-property JSON schema (compact: no free whitespace), unconstrained again with each request
stopped at its constrained output's length ("length-matched": the same batch sizes step by
step, so the ratio to it is the constraint's own cost, not the shorter outputs' emptier
batches), and the two halves mixed. The constrained and length-matched runs alternate
`--repeats` times (the best of each counts: the machine's noise only slows a run). Reported:
output tokens/s of each, both ratios, the host time of filling the
mask rows per step (`StructuredOutputs.prepare_step`, timed in place; the batch size of
each step beside it), and the compile time of a 20-property schema, fresh and cached.
Prints one table.
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
    p.add_argument("--output-json", default=None)
    return p.parse_args(argv)


def _timed_prepare_step(engine, records: list) -> None:
    """Wraps the engine's mask filling to record (seconds, rows) per step."""
    so = engine.structured_outputs
    original = so.prepare_step

    def prepare_step(out):
        start = time.perf_counter()
        result = original(out)
        rows = 0 if result.grammar_bitmask is None else len(result.grammar_bitmask)
        if rows:
            records.append((time.perf_counter() - start, rows))
        return result

    so.prepare_step = prepare_step


def main(argv=None) -> dict:
    args = parse_args(argv)
    from jaxserve import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, progress=False,
              background_compilation=False)
    engine = llm.llm_engine
    prompts = [f"Person {i}: describe them." for i in range(args.num_prompts)]
    free = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                 structured_outputs=StructuredOutputsParams(
                                     json=SCHEMA, disable_any_whitespace=True))
    runs = {"unconstrained": [free] * len(prompts), "json_schema": [constrained] * len(prompts),
            "mixed (half each)": [free, constrained] * (len(prompts) // 2)}
    llm.generate(prompts[:4], [free, constrained] * 2, use_tqdm=False)  # warm-up
    masks: list[tuple[float, int]] = []
    _timed_prepare_step(engine, masks)
    results, rows = {}, []
    def run(name: str, params: list) -> list:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
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
    per_step = np.array([s for s, _ in masks]) * 1e3
    widest = max((b for _, b in masks), default=0)
    at_widest = np.array([s for s, b in masks if b == widest]) * 1e3
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
        ["mask fill per step, p50 / p99 ms", f"{np.median(per_step):.3f} / "
         f"{np.percentile(per_step, 99):.3f}" if len(per_step) else "-"],
        [f"mask fill at the widest step (B = {widest}), p50 ms",
         f"{np.median(at_widest):.3f}" if len(at_widest) else "-"],
        ["20-property schema compile, fresh ms", round(fresh * 1e3, 2)],
        ["20-property schema compile, cached ms", round(cached * 1e3, 4)],
    ])
    results.update(ratio=ratio, ratio_length_matched=ratio_matched, mask_ms_p50=float(np.median(per_step)) if len(per_step) else None,
                   mask_ms_widest_p50=float(np.median(at_widest)) if len(at_widest) else None,
                   widest_batch=widest, compile_fresh_ms=fresh * 1e3,
                   compile_cached_ms=cached * 1e3)
    write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    main()
