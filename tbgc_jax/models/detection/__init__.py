"""DINO detection head, its set-prediction losses and box utilities."""

from tbgc_jax.models.detection.dino import CHALLENGE_NUM_CLASSES as CHALLENGE_NUM_CLASSES
from tbgc_jax.models.detection.dino import PRESETS as PRESETS
from tbgc_jax.models.detection.dino import DenoisingLayout as DenoisingLayout
from tbgc_jax.models.detection.dino import DINOConfig as DINOConfig
from tbgc_jax.models.detection.dino import DINOHead as DINOHead
from tbgc_jax.models.detection.dino import denoising_layout as denoising_layout
from tbgc_jax.models.detection.losses import match_cost as match_cost
from tbgc_jax.models.detection.losses import match_predictions as match_predictions
from tbgc_jax.models.detection.losses import set_prediction_losses as set_prediction_losses
from tbgc_jax.models.detection.losses import sigmoid_focal_loss as sigmoid_focal_loss
from tbgc_jax.ops.boxes import box_cxcywh_to_xyxy as box_cxcywh_to_xyxy
from tbgc_jax.ops.boxes import box_iou as box_iou
from tbgc_jax.ops.boxes import box_xyxy_to_cxcywh as box_xyxy_to_cxcywh
from tbgc_jax.ops.boxes import generalized_box_iou as generalized_box_iou
from tbgc_jax.ops.boxes import pairwise_box_iou as pairwise_box_iou
from tbgc_jax.ops.boxes import (
    pairwise_generalized_box_iou as pairwise_generalized_box_iou,
)
from tbgc_jax.ops.boxes import rescale_boxes as rescale_boxes
