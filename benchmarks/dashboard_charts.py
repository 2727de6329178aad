"""The dashboard's charts as one PNG, from the step records of an offline run.

`save_charts(records, path)` draws what GET /dashboard shows over time (KV blocks, tokens
per second, each step's batch mix, prefix-cache hit rate, requests, step times) from
`LLM.llm_engine.step_stats.records()`, e.g. in the throughput notebook. Run as a script it
serves `--num-users` requests sharing a `--prefix-len`-token prefix through `LLM` and
saves the charts of that run to `--out`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxserve.engine.stats_summary import summarize

COLORS = {"free": "#e5e7eb", "cached": "#93c5fd", "used": "#2563eb", "prefill": "#7c3aed",
          "decode": "#10b981", "padding": "#d1d5db", "waiting": "#f59e0b"}


def windows(records, interval: float) -> list[dict]:
    """Summaries of consecutive `interval`-second windows from the first record to the last."""
    if not records:
        return []
    start = records[0].time - interval  # the first window holds the first record
    count = int(np.ceil((records[-1].time - start) / interval))
    return [summarize(records, start + i * interval, start + (i + 1) * interval)
            for i in range(count)]


def save_charts(records, path: str, *, interval: float = 0.5) -> str:
    """Draws the run's charts into the PNG `path` (matplotlib); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("save_charts needs at least one step record")
    summaries = windows(records, interval)
    t = np.array([s["time"] for s in summaries]) - records[0].time
    fig, axes = plt.subplots(3, 2, figsize=(12, 10))
    kv, tokens, batch, prefix, requests, step = axes.flat

    column = lambda f: np.array([f(s) for s in summaries], dtype=float)  # noqa: E731
    kv.stackplot(t, column(lambda s: s["kv"]["used"]), column(lambda s: s["kv"]["cached"]),
                 column(lambda s: s["kv"]["free"]), labels=["in use", "cached, reusable", "free"],
                 colors=[COLORS["used"], COLORS["cached"], COLORS["free"]])
    kv.set(title="KV cache blocks", xlabel="s")

    tokens.plot(t, column(lambda s: s["tokens_per_s"]["prompt"]), label="prompt",
                color=COLORS["prefill"])
    tokens.plot(t, column(lambda s: s["tokens_per_s"]["generated"]), label="generated",
                color=COLORS["decode"])
    tokens.set(title="Tokens per second", xlabel="s")

    steps = np.arange(len(records))
    parts = [np.array([getattr(r, name) for r in records]) for name in
             ("num_prefill_tokens", "num_decode_tokens", "num_padding_tokens")]
    batch.stackplot(steps, *parts, labels=["prefill", "decode", "padding"],
                    colors=[COLORS["prefill"], COLORS["decode"], COLORS["padding"]], step="mid")
    batch.set(title="Batch composition (tokens per step)", xlabel="step")

    hit_rate = column(lambda s: np.nan if s["prefix_cache"]["hit_rate"] is None
                      else s["prefix_cache"]["hit_rate"])
    prefix.plot(t, hit_rate, "o-", color=COLORS["used"], label="hit rate")
    prefix.set(title="Prefix cache hit rate", xlabel="s", ylim=(0, 1.05))

    requests.plot(t, column(lambda s: s["requests"]["running"]), label="running",
                  color=COLORS["used"])
    requests.plot(t, column(lambda s: s["requests"]["waiting"]), label="waiting",
                  color=COLORS["waiting"])
    requests.set(title="Requests", xlabel="s")

    step.plot(steps, [1000 * r.host_seconds for r in records], label="host", lw=0.8)
    step.plot(steps, [1000 * r.device_wait_seconds for r in records], label="device wait",
              lw=0.8)
    step.set(title="Step time (ms)", xlabel="step")

    for ax in axes.flat:
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--num-users", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--out", default="dashboard.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from jaxserve import LLM, SamplingParams

    args = parse_args(argv)
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, progress=False)
    rng = np.random.default_rng(0)
    vocab = llm.llm_engine.model_config.vocab_size
    prefix = rng.integers(0, vocab, args.prefix_len).tolist()
    prompts = [{"prompt_token_ids": prefix + rng.integers(0, vocab, 8).tolist()}
               for _ in range(args.num_users)]
    llm.generate(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True),
                 use_tqdm=False)
    print(f"charts written to {save_charts(llm.llm_engine.step_stats.records(), args.out)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
