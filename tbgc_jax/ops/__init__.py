"""Array primitives shared by the model heads (sampling at fractional locations)."""

from tbgc_jax.ops.matching import hungarian_match as hungarian_match
from tbgc_jax.ops.sampling import bilinear_sample as bilinear_sample
from tbgc_jax.ops.sampling import ms_deform_attn as ms_deform_attn
