"""The throughput benchmark's request lists: `random` and `sharegpt-like`, and their JSON form.

Both draw prompt ids uniformly over the tokenizer's non-special ids, from the seed. `random`
takes lengths uniform in a range around a mean (vLLM's `--dataset-name random`);
`sharegpt-like` takes them from the synthetic histogram in data/sharegpt_like_lengths.json
(no data set is downloaded). `requests_to_json` is what a backend in another process (the
vLLM runner) reads, so every backend gets exactly the same list.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

SHAREGPT_LIKE_LENGTHS = pathlib.Path(__file__).resolve().parent / "data" / "sharegpt_like_lengths.json"


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]  # the prompt; random ids, never special tokens
    output_len: int  # tokens to generate, EOS ignored


def _allowed_ids(tokenizer) -> np.ndarray:
    return np.setdiff1d(np.arange(len(tokenizer)), tokenizer.all_special_ids)


def sample_random_requests(tokenizer, *, num_prompts: int, input_len: int, output_len: int,
                           range_ratio: float, seed: int) -> list[BenchRequest]:
    """Lengths uniform in [len * (1 - r), len * (1 + r)]; ids uniform over non-special ids."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    allowed = _allowed_ids(tokenizer)

    def lengths(mean: int) -> np.ndarray:
        low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.integers(low, high + 1, size=num_prompts)

    input_lens, output_lens = lengths(input_len), lengths(output_len)
    return [BenchRequest(tuple(int(t) for t in rng.choice(allowed, size=int(n))), int(m))
            for n, m in zip(input_lens, output_lens)]


def load_length_histogram(path: str | pathlib.Path = SHAREGPT_LIKE_LENGTHS) -> dict:
    """{"input_len": {"bin_edges", "weights", "mean"}, "output_len": {...}}, validated."""
    data = json.loads(pathlib.Path(path).read_text())
    for key in ("input_len", "output_len"):
        edges, weights = data[key]["bin_edges"], data[key]["weights"]
        if len(edges) != len(weights) + 1 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"{path}: {key} needs increasing bin_edges, one more than weights")
        if edges[0] < 1 or abs(sum(weights) - 1.0) > 1e-3:
            raise ValueError(f"{path}: {key} edges must be >= 1 and weights sum to 1")
    return data


def _draw_lengths(rng: np.random.Generator, hist: dict, n: int) -> np.ndarray:
    """A bin by weight, then a length uniform in [edge_i, edge_i+1)."""
    edges = np.asarray(hist["bin_edges"])
    weights = np.asarray(hist["weights"], dtype=float)
    bins = rng.choice(len(weights), size=n, p=weights / weights.sum())
    return rng.integers(edges[bins], edges[bins + 1])


def sample_sharegpt_like_requests(tokenizer, *, num_prompts: int, seed: int,
                                  output_len: int | None = None,
                                  max_model_len: int | None = None,
                                  lengths_path: str | pathlib.Path = SHAREGPT_LIKE_LENGTHS,
                                  ) -> list[BenchRequest]:
    """Lengths from the ShareGPT-like histogram. `output_len` overrides every output length
    (vLLM's `--sharegpt-output-len`); pairs longer than `max_model_len` are drawn again."""
    hist = load_length_histogram(lengths_path)
    rng = np.random.default_rng(seed)
    allowed = _allowed_ids(tokenizer)
    requests: list[BenchRequest] = []
    for _ in range(1000):  # redraws for pairs that do not fit; a few rounds at most
        need = num_prompts - len(requests)
        if need == 0:
            return requests
        ins = _draw_lengths(rng, hist["input_len"], need)
        outs = (np.full(need, output_len) if output_len is not None
                else _draw_lengths(rng, hist["output_len"], need))
        for n, m in zip(ins, outs):
            if max_model_len is None or n + m <= max_model_len:
                requests.append(BenchRequest(
                    tuple(int(t) for t in rng.choice(allowed, size=int(n))), int(m)))
    raise ValueError(f"max_model_len={max_model_len} is too small for the ShareGPT-like lengths")


def requests_to_json(requests: list[BenchRequest], warm_up: list[BenchRequest]) -> dict:
    """The request lists as plain JSON for a backend in another process."""
    def rows(items):
        return [{"prompt_token_ids": list(r.prompt_token_ids), "output_len": r.output_len}
                for r in items]
    return {"requests": rows(requests), "warm_up": rows(warm_up)}
