"""Evaluation metrics of the three tasks."""

from tbgc_jax.metrics.classification import Top1Accuracy as Top1Accuracy
from tbgc_jax.metrics.classification import top1_accuracy as top1_accuracy
from tbgc_jax.metrics.classification import top1_counts as top1_counts
from tbgc_jax.metrics.detection import DetectionAccumulator as DetectionAccumulator
from tbgc_jax.metrics.detection import coco_map as coco_map
from tbgc_jax.metrics.detection import to_coco_results as to_coco_results
