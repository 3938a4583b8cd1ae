"""tbgc-jax: task-level backbone-oriented gradient clipping for multi-task JAX training."""

from tbgc_jax._src.clipping import TaskClipState as TaskClipState
from tbgc_jax._src.clipping import per_task_clip as per_task_clip
from tbgc_jax._src.clipping import sum_tasks as sum_tasks
from tbgc_jax._src.clipping import task_diagnostics as task_diagnostics
from tbgc_jax._src.clipping import tbgc as tbgc
from tbgc_jax._src.clipping import vanilla_clip as vanilla_clip
from tbgc_jax._src.diagnostics import GradientDiagnostics as GradientDiagnostics
from tbgc_jax._src.diagnostics import gradient_diagnostics as gradient_diagnostics
from tbgc_jax._src.grads import per_task_value_and_grad as per_task_value_and_grad
from tbgc_jax._src.masks import path_mask as path_mask
from tbgc_jax._src.registry import check_method as check_method
from tbgc_jax._src.registry import get_method as get_method
from tbgc_jax._src.registry import make_method as make_method
from tbgc_jax._src.registry import method_names as method_names
from tbgc_jax._src.registry import register as register
from tbgc_jax._src.registry import unregister as unregister

__version__ = "0.1.0"
