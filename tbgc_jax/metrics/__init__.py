"""Task metrics: detection mAP50, segmentation mIoU, classification top-1, and their exports."""

from tbgc_jax.metrics.detection import DetectionAccumulator as DetectionAccumulator
from tbgc_jax.metrics.detection import coco_map as coco_map
from tbgc_jax.metrics.detection import to_coco_results as to_coco_results
