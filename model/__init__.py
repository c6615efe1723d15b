"""Backbones, heads, shared losses and the pre-training methods (model/methods)."""
