"""Evaluation metrics of the three tasks."""

from tbgc_jax.metrics.classification import Top1Accuracy as Top1Accuracy
from tbgc_jax.metrics.classification import top1_accuracy as top1_accuracy
from tbgc_jax.metrics.classification import top1_counts as top1_counts
from tbgc_jax.metrics.detection import DetectionAccumulator as DetectionAccumulator
from tbgc_jax.metrics.detection import coco_map as coco_map
from tbgc_jax.metrics.detection import load_coco_ground_truth as load_coco_ground_truth
from tbgc_jax.metrics.detection import records_to_coco as records_to_coco
from tbgc_jax.metrics.detection import to_coco_results as to_coco_results
from tbgc_jax.metrics.segmentation import ConfusionMatrix as ConfusionMatrix
from tbgc_jax.metrics.segmentation import confusion_matrix as confusion_matrix
from tbgc_jax.metrics.segmentation import iou_from_confusion as iou_from_confusion
from tbgc_jax.metrics.segmentation import label_map_to_polygons as label_map_to_polygons
from tbgc_jax.metrics.segmentation import restore_label_map as restore_label_map
from tbgc_jax.metrics.segmentation import save_label_png as save_label_png
from tbgc_jax.metrics.segmentation import scores_to_label_map as scores_to_label_map
from tbgc_jax.metrics.segmentation import seg_submission as seg_submission
