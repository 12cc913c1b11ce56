"""Sampling: logits to tokens (sampler.py)."""
