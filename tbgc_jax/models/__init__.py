"""Models: InternImage backbone (DCNv3), task heads and the multi-task container."""

from tbgc_jax.models.classification import ClassificationHead as ClassificationHead
from tbgc_jax.models.classification import arcface_logits as arcface_logits
from tbgc_jax.models.dcnv3 import DCNv3 as DCNv3
from tbgc_jax.models.dcnv3 import dcnv3_core as dcnv3_core
from tbgc_jax.models.internimage import PRESETS as PRESETS
from tbgc_jax.models.internimage import InternImage as InternImage
from tbgc_jax.models.internimage import InternImageConfig as InternImageConfig
from tbgc_jax.models.multitask import MultiTaskModel as MultiTaskModel
from tbgc_jax.models.multitask import backbone_mask as backbone_mask
from tbgc_jax.models.multitask import normalize_images as normalize_images
from tbgc_jax.models.rngs import construction_rngs as construction_rngs
