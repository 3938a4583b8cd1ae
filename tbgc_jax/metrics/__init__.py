"""Task metrics: detection mAP50, segmentation mIoU, classification top-1, and their exports."""

from tbgc_jax.metrics.segmentation import ConfusionMatrix as ConfusionMatrix
from tbgc_jax.metrics.segmentation import confusion_matrix as confusion_matrix
from tbgc_jax.metrics.segmentation import iou_from_confusion as iou_from_confusion
from tbgc_jax.metrics.segmentation import label_map_to_polygons as label_map_to_polygons
from tbgc_jax.metrics.segmentation import restore_label_map as restore_label_map
from tbgc_jax.metrics.segmentation import save_label_png as save_label_png
from tbgc_jax.metrics.segmentation import seg_submission as seg_submission
