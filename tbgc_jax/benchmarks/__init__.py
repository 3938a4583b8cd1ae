"""Multi-task benchmarks that run offline on a CPU: QM9 and the embedded three-task data."""
