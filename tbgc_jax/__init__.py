"""tbgc-jax: task-level backbone-oriented gradient clipping for multi-task JAX training."""

from tbgc_jax._src.clipping import TaskClipState as TaskClipState
from tbgc_jax._src.clipping import per_task_clip as per_task_clip
from tbgc_jax._src.clipping import task_diagnostics as task_diagnostics
from tbgc_jax._src.clipping import tbgc as tbgc
from tbgc_jax._src.clipping import vanilla_clip as vanilla_clip
from tbgc_jax._src.grads import per_task_value_and_grad as per_task_value_and_grad
from tbgc_jax._src.masks import path_mask as path_mask
from tbgc_jax._src.weighting import DwaState as DwaState
from tbgc_jax._src.weighting import FamoState as FamoState
from tbgc_jax._src.weighting import RlwState as RlwState
from tbgc_jax._src.weighting import UncertaintyState as UncertaintyState
from tbgc_jax._src.weighting import dwa as dwa
from tbgc_jax._src.weighting import famo as famo
from tbgc_jax._src.weighting import rlw as rlw
from tbgc_jax._src.weighting import uncertainty as uncertainty

__version__ = "0.1.0"
