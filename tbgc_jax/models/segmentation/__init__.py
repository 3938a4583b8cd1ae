"""Mask2Former semantic-segmentation head: pixel decoder, masked-attention decoder, losses."""

from tbgc_jax.models.segmentation.head import CHALLENGE_NUM_CLASSES as CHALLENGE_NUM_CLASSES
from tbgc_jax.models.segmentation.head import PRESETS as PRESETS
from tbgc_jax.models.segmentation.head import Mask2FormerConfig as Mask2FormerConfig
from tbgc_jax.models.segmentation.head import Mask2FormerHead as Mask2FormerHead
from tbgc_jax.models.segmentation.head import PixelDecoder as PixelDecoder
from tbgc_jax.models.segmentation.head import attention_mask as attention_mask
from tbgc_jax.models.segmentation.losses import importance_points as importance_points
from tbgc_jax.models.segmentation.losses import layer_loss as layer_loss
from tbgc_jax.models.segmentation.losses import losses_at_points as losses_at_points
from tbgc_jax.models.segmentation.losses import mask2former_loss as mask2former_loss
from tbgc_jax.models.segmentation.losses import match_cost as match_cost
from tbgc_jax.models.segmentation.losses import num_uniform as num_uniform
from tbgc_jax.models.segmentation.losses import semantic_targets as semantic_targets
