"""transformers as the oracle: greedy continuations, and random prompts to feed both sides."""

from __future__ import annotations

import numpy as np


def random_prompts(lengths, *, vocab: int = 320, seed: int = 0,
                   low: int = 3) -> list[list[int]]:
    """One prompt of random ids in [low, vocab) per length; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab, size=n).tolist() for n in lengths]


def hf_greedy(model_dir, prompts, max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding), for
    exactly `max_new_tokens` tokens (EOS ignored)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 eos_token_id=None, pad_token_id=0)
            outputs.append(out[0, len(prompt):].tolist())
    return outputs
