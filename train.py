"""Trains the multi-task model with TBGC, then evaluates it.

  python train.py --config configs/tiny.py --workdir /tmp/tbgc_tiny [--config.grad.method=vanilla]

Resumes automatically from the latest finalized checkpoint in --workdir. On several hosts,
run the same command on every host with the coordinator address (see README, "Many GPUs").
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and metrics go here.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: cluster auto-detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of hosts.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This host's index.")
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300,
                                     "Seconds to wait for every host to join (--multihost).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show library INFO logs in the terminal too "
                             "(they always go to WORKDIR/train.log).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax

  from tbgc_jax.trainer.logs import route_library_logs

  log_file = route_library_logs(_WORKDIR.value, "train", verbose=_VERBOSE.value)

  if _MULTIHOST.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               initialization_timeout=_INIT_TIMEOUT.value)
  from tbgc_jax.trainer.setup import use_compilation_cache
  from tbgc_jax.trainer.train import train_and_evaluate

  use_compilation_cache(_WORKDIR.value)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(f"checkpoints, metrics.jsonl, plots (*.png) and the full log ({log_file}) are in "
          f"{_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main)
