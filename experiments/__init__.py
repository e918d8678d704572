"""Experiments: Flax models, pre-trained weights, data and training entry points."""
