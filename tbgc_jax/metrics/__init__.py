"""Evaluation metrics of the three tasks."""

from tbgc_jax.metrics.classification import Top1Accuracy as Top1Accuracy
from tbgc_jax.metrics.classification import top1_accuracy as top1_accuracy
from tbgc_jax.metrics.classification import top1_counts as top1_counts
