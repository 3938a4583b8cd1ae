"""Trains the multi-task model with TBGC, then evaluates it.

  python train.py --config configs/tiny.py --workdir /tmp/tbgc_tiny [--config.grad.method=vanilla]

Resumes automatically from the latest finalized checkpoint in --workdir (a checkpoint of
another model, task set or method is refused: start a new workdir with
``--config.init_from=OLD_WORKDIR`` to begin from its weights). One run per workdir
(``<workdir>/train.lock``). Ctrl-C finishes the step, writes a checkpoint and exits with
status 130; a second Ctrl-C aborts at once. A config or usage mistake prints one line and
exits with status 2 (the traceback is in ``<workdir>/train.log``). On several hosts, run the
same command on every host with the coordinator address (see README, "Many GPUs").
"""

import sys

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
  from tbgc_jax.trainer import cli
  from tbgc_jax.trainer.lock import WorkdirLock

  # Taken before anything writes to the workdir; a group of processes: process 0 takes it
  # in train_and_evaluate.
  lock = WorkdirLock(_WORKDIR.value, enabled=not _MULTIHOST.value)
  with cli.one_line_errors():
    lock.acquire()
  try:
    from tbgc_jax.trainer.logs import route_library_logs

    log_file = route_library_logs(_WORKDIR.value, "train", verbose=_VERBOSE.value)
    with cli.one_line_errors(log_file):
      import jax

      if _MULTIHOST.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value, initialization_timeout=_INIT_TIMEOUT.value)
      from tbgc_jax.trainer.setup import use_compilation_cache
      from tbgc_jax.trainer.train import Interrupted, train_and_evaluate

      use_compilation_cache(_WORKDIR.value)
      try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      except Interrupted as e:
        print(f"{e} (the full log: {log_file})", file=sys.stderr, flush=True)
        sys.exit(cli.EXIT_INTERRUPTED)
      if jax.process_index() == 0:
        print(f"checkpoints, metrics.jsonl, plots (*.png) and the full log ({log_file}) are "
              f"in {_WORKDIR.value}")
  finally:
    lock.release()


if __name__ == "__main__":
  from tbgc_jax.trainer.cli import parse_flags

  app.run(main, flags_parser=parse_flags)
