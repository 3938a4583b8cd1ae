"""Task specifications (det, seg, cls and your own) and their registry (see ``base``)."""

from tbgc_jax.data.spec import DataSpec as DataSpec
from tbgc_jax.data.spec import EmbeddedPool as EmbeddedPool
from tbgc_jax.data.spec import RecordSet as RecordSet
from tbgc_jax.tasks.base import EvalContext as EvalContext
from tbgc_jax.tasks.base import EvalSpec as EvalSpec
from tbgc_jax.tasks.base import Evaluator as Evaluator
from tbgc_jax.tasks.base import HeadSpec as HeadSpec
from tbgc_jax.tasks.base import TaskSpec as TaskSpec
from tbgc_jax.tasks.base import get_task as get_task
from tbgc_jax.tasks.base import metric_key as metric_key
from tbgc_jax.tasks.base import register_task as register_task
from tbgc_jax.tasks.base import task_names as task_names
from tbgc_jax.tasks.base import unregister_task as unregister_task
