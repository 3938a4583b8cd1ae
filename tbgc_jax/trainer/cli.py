"""What ``train.py`` and ``eval.py`` do with mistakes and interruptions at the terminal.

A usage or config mistake (a misspelled config field, an unknown method, a negative norm, a
workdir held by another run, a checkpoint of another config, no checkpoint) prints one line,
``<program>: error: <message>``, and exits with status 2; its traceback goes to the log file
only. Ctrl-C exits with status 130 (after the checkpoint, see `train.Interrupted`).

  app.run(main, flags_parser=cli.parse_flags)

  def main(argv):
    with cli.one_line_errors(log_file_of_this_run):
      ...
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

from absl import flags


class ConfigError(ValueError):
  """A usage or config mistake: the command line tools print its message as one line."""


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def _program() -> str:
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "tbgc"


def _message(e: BaseException) -> str:
  """An exception's message on one line (unwrapping ``KeyError(KeyError('...'))``)."""
  arg = e
  while isinstance(arg, BaseException) and arg.args:
    arg = arg.args[0]
  text = arg if isinstance(arg, str) else str(e)
  return " ".join(text.split())


def fail(message: str, code: int = EXIT_USAGE):
  """Prints ``<program>: error: <message>`` to stderr and exits with ``code``."""
  print(f"{_program()}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for ``app.run(..., flags_parser=parse_flags)``), a mistake in the
  flags or the config overrides (``--config.grad.methd=...``) printed as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{_message(e)} (--helpshort lists the flags)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = _message(e)
    # Name the override at fault: the one whose field path holds the quoted name.
    quoted = message.split("'")[1] if message.count("'") >= 2 else None
    at = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and quoted
          and quoted in a.split("=")[0].split(".")]
    fail(f"{at[0] if at else 'in the flags or config overrides'}: {message}")
  raise AssertionError  # unreachable: fail exits


def _to_log(log_file: str | None, exc: BaseException) -> None:
  if log_file:
    with contextlib.suppress(OSError), open(log_file, "a") as f:
      f.write("".join(traceback.format_exception(exc)))


@contextlib.contextmanager
def one_line_errors(log_file: str | None = None, *, errors: tuple[type, ...] = ()):
  """Turns the trainer's usage errors and interruptions into one line and an exit status.

  Args:
    log_file: where the traceback goes (None: nowhere).
    errors: more exception types to treat as usage errors.
  """
  from tbgc_jax.trainer.lock import LockHeld

  try:
    yield
  except (ConfigError, LockHeld, *errors) as e:
    _to_log(log_file, e)
    fail(_message(e))
  except KeyboardInterrupt as e:
    _to_log(log_file, e)
    fail("aborted by Ctrl-C: nothing since the last checkpoint was saved", EXIT_INTERRUPTED)
