"""tbgc-jax: task-level backbone-oriented gradient clipping for multi-task JAX training."""

from tbgc_jax._src.aggregation import GramianState as GramianState
from tbgc_jax._src.aggregation import Step as Step
from tbgc_jax._src.aggregation import from_weighting as from_weighting
from tbgc_jax._src.base import safe_div as safe_div
from tbgc_jax._src.clipping import TaskClipState as TaskClipState
from tbgc_jax._src.clipping import all_finite as all_finite
from tbgc_jax._src.clipping import backbone_clip as backbone_clip
from tbgc_jax._src.clipping import per_task_clip as per_task_clip
from tbgc_jax._src.clipping import sum_tasks as sum_tasks
from tbgc_jax._src.clipping import task_diagnostics as task_diagnostics
from tbgc_jax._src.clipping import task_rescale as task_rescale
from tbgc_jax._src.clipping import tbgc as tbgc
from tbgc_jax._src.clipping import vanilla_clip as vanilla_clip
from tbgc_jax._src.diagnostics import GradientDiagnostics as GradientDiagnostics
from tbgc_jax._src.diagnostics import gradient_diagnostics as gradient_diagnostics
from tbgc_jax._src.grads import per_task_value_and_grad as per_task_value_and_grad
from tbgc_jax._src.masks import path_mask as path_mask
from tbgc_jax._src.methods import aligned_mtl as aligned_mtl
from tbgc_jax._src.methods import cagrad as cagrad
from tbgc_jax._src.methods import config as config
from tbgc_jax._src.methods import dualproj as dualproj
from tbgc_jax._src.methods import fairgrad as fairgrad
from tbgc_jax._src.methods import graddrop as graddrop
from tbgc_jax._src.methods import gradvac as gradvac
from tbgc_jax._src.methods import imtl_g as imtl_g
from tbgc_jax._src.methods import mean as mean
from tbgc_jax._src.methods import mgda as mgda
from tbgc_jax._src.methods import nash_mtl as nash_mtl
from tbgc_jax._src.methods import pcgrad as pcgrad
from tbgc_jax._src.methods import upgrad as upgrad
from tbgc_jax._src.registry import check_method as check_method
from tbgc_jax._src.registry import get_method as get_method
from tbgc_jax._src.registry import make_method as make_method
from tbgc_jax._src.registry import method_names as method_names
from tbgc_jax._src.registry import register as register
from tbgc_jax._src.registry import unregister as unregister
from tbgc_jax._src.weighting import DwaState as DwaState
from tbgc_jax._src.weighting import FamoState as FamoState
from tbgc_jax._src.weighting import UncertaintyState as UncertaintyState
from tbgc_jax._src.weighting import dwa as dwa
from tbgc_jax._src.weighting import famo as famo
from tbgc_jax._src.weighting import rlw as rlw
from tbgc_jax._src.weighting import uncertainty as uncertainty

# isort: split
# Scalarizers and LibMTL methods
from tbgc_jax._src.libmtl import DbMtlState as DbMtlState
from tbgc_jax._src.libmtl import GradNormState as GradNormState
from tbgc_jax._src.libmtl import MocoState as MocoState
from tbgc_jax._src.libmtl import db_mtl as db_mtl
from tbgc_jax._src.libmtl import gradnorm as gradnorm
from tbgc_jax._src.libmtl import moco as moco
from tbgc_jax._src.scalarization import ImtlState as ImtlState
from tbgc_jax._src.scalarization import geometric_mean as geometric_mean
from tbgc_jax._src.scalarization import imtl as imtl
from tbgc_jax._src.scalarization import imtl_l as imtl_l
from tbgc_jax._src.scalarization import pbi as pbi
from tbgc_jax._src.scalarization import stch as stch

# isort: split
# Methods after TorchJD 0.18
from tbgc_jax._src.robust import constant as constant
from tbgc_jax._src.robust import krum as krum
from tbgc_jax._src.robust import trimmed_mean as trimmed_mean
from tbgc_jax._src.stateful import CrmogmState as CrmogmState
from tbgc_jax._src.stateful import ExcessMtlState as ExcessMtlState
from tbgc_jax._src.stateful import PcdState as PcdState
from tbgc_jax._src.stateful import crmogm as crmogm
from tbgc_jax._src.stateful import excess_mtl as excess_mtl
from tbgc_jax._src.stateful import modo as modo
from tbgc_jax._src.stateful import pcd as pcd
from tbgc_jax._src.stateful import sdmgrad as sdmgrad

__version__ = "0.1.0"
