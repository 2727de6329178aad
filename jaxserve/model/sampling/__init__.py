"""Sampling on the device: `sampler` turns [B, V] logits and per-row parameters into token
ids (greedy, temperature, top-k/p, min-p, penalties, logit bias, seeds) and logprobs."""
