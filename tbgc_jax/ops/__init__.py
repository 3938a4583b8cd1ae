"""Array primitives shared by the models and metrics: sampling at fractional locations,
Hungarian matching, box conversions and IoU (`tbgc_jax.ops.boxes`)."""

from tbgc_jax.ops.matching import hungarian_match as hungarian_match
from tbgc_jax.ops.sampling import bilinear_sample as bilinear_sample
from tbgc_jax.ops.sampling import ms_deform_attn as ms_deform_attn
