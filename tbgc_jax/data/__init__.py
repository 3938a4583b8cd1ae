"""Data for the tasks: field kinds, records, the format registry, embedded data, augmentations,
grain pipelines."""

from tbgc_jax.data.augment import RandomChoice as RandomChoice
from tbgc_jax.data.augment import build_augment as build_augment
from tbgc_jax.data.augment import build_chain as build_chain
from tbgc_jax.data.batching import collate as collate
from tbgc_jax.data.batching import pad_example as pad_example
from tbgc_jax.data.embedded import embedded_dir as embedded_dir
from tbgc_jax.data.embedded import ensure_embedded as ensure_embedded
from tbgc_jax.data.fields import Boxes as Boxes
from tbgc_jax.data.fields import ClassMap as ClassMap
from tbgc_jax.data.fields import DenseMap as DenseMap
from tbgc_jax.data.fields import ImageLabel as ImageLabel
from tbgc_jax.data.fields import Keypoints as Keypoints
from tbgc_jax.data.fields import Kind as Kind
from tbgc_jax.data.formats import ReadContext as ReadContext
from tbgc_jax.data.formats import register_reader as register_reader
from tbgc_jax.data.pipeline import eval_dataset as eval_dataset
from tbgc_jax.data.pipeline import eval_iterator as eval_iterator
from tbgc_jax.data.pipeline import make_source as make_source
from tbgc_jax.data.pipeline import train_dataset as train_dataset
from tbgc_jax.data.pipeline import train_iterator as train_iterator
from tbgc_jax.data.records import DataValidationError as DataValidationError
from tbgc_jax.data.spec import DataSpec as DataSpec
from tbgc_jax.data.spec import EmbeddedPool as EmbeddedPool
from tbgc_jax.data.spec import RecordSet as RecordSet
