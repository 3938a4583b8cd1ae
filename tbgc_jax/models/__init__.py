"""Flax NNX models: backbone, task heads and the multi-task container."""
