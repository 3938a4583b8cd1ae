"""Experiments: speed and memory benchmarks, the methods comparison (`python -m
benchmarks.compare`) and the paper's ablations (`python -m benchmarks.reproduce`). Run them
from the repository root with ``python -m benchmarks.<name>``."""
