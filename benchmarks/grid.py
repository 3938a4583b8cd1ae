"""The grid runner and results file of every experiment command (`benchmarks.compare`,
`benchmarks.reproduce`), and the stamp their figures carry.

A results file is JSONL, one record per finished run. `run_grid` runs the jobs whose key is not
in the file yet and appends each record as soon as it exists (flushed and synced), so an
interrupted grid resumes where it stopped; a torn last line (a crash mid-write) is skipped on
reading and never glued to the next record.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

Record = dict[str, Any]


def read_results(path: str) -> list[Record]:
  """The records of a JSONL results file ([] if it does not exist); torn lines are skipped."""
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def append_result(path: str, record: Mapping[str, Any]) -> None:
  """Appends one record on a line of its own (after a torn last line, on the next line)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  torn = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
  with open(path, "a") as f:
    f.write(("\n" if torn else "") + json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_grid(jobs: Iterable[Record], path: str, run: Callable[[Record], Record], *,
             key: Callable[[Mapping[str, Any]], str],
             label: Callable[[Mapping[str, Any]], str],
             describe: Callable[[Record], str],
             retry_later: tuple[type[BaseException], ...] = (),
             log: Callable[[str], None] = print) -> list[Record]:
  """Runs every job whose key is not in the results file yet and appends its record.

  Args:
    jobs: the grid's jobs, in execution order; ``key(job)`` must equal ``key(record)`` of the
      record ``run(job)`` returns.
    path: JSONL results file.
    run: trains and scores one job, returning the record to append.
    key: a job's or record's identity in the file.
    label: a job's name in the log.
    describe: one line on a finished record for the log.
    retry_later: exceptions that mark a failed run: logged, left out of the file (a later call
      runs it again) and the grid goes on. Other exceptions propagate.
    log: called with one line per job.

  Returns:
    The records written by this call.
  """
  done = {key(r) for r in read_results(path)}
  jobs = list(jobs)
  written = []
  for i, job in enumerate(jobs):
    head = f"[{i + 1}/{len(jobs)}] {label(job)}"
    if key(job) in done:
      continue
    try:
      record = run(job)
    except retry_later as e:
      log(f"{head}: FAILED ({e}); re-run the command to retry")
      continue
    append_result(path, record)
    done.add(key(record))
    written.append(record)
    log(f"{head}: {describe(record)}")
  return written


# ------------------------------------------------------------------ stamps
def environment() -> dict[str, str]:
  """Versions and machine of this process: what a results record and a figure carry."""
  import flax
  import jax
  import optax

  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                     f"{jax.devices()[0].platform}"}


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
  """``python -m <module> <args>`` as typed (``argv`` default: this process's arguments)."""
  args = sys.argv[1:] if argv is None else argv
  return " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])


def stamp(env: Mapping[str, str], command: str, seeds: str, steps: str, extra: str = "") -> str:
  """The one-paragraph stamp of a figure: machine, versions, seeds, steps, command."""
  versions = ", ".join(f"{k} {env[k]}" for k in ("jax", "flax", "optax") if k in env)
  text = f"{env.get('machine', 'unknown machine')}; {versions}; seeds {seeds}; {steps} steps."
  if extra:
    text += f" {extra}"
  return f"{text} Command: {command}"


def write_stamp(figure: str, text: str) -> str:
  """Writes the stamp beside a figure (``<figure>.txt``, the caption the docs show); returns
  the sidecar's path."""
  path = os.path.splitext(figure)[0] + ".txt"
  with open(path, "w") as f:
    f.write(text.strip() + "\n")
  return path


def draw_stamp(fig: Any, text: str, width: int = 150) -> None:
  """Prints the stamp into a matplotlib figure's bottom margin (leave it with ``tight_layout(
  rect=(0, margin, 1, 1))``)."""
  fig.text(0.01, 0.01, "\n".join(textwrap.wrap(text, width)), fontsize=7, va="bottom")


# ------------------------------------------------------------------ generated blocks of the docs
def _markers(name: str) -> tuple[str, str]:
  return f"<!-- begin: {name} -->", f"<!-- end: {name} -->"


def read_block(text: str, name: str) -> str | None:
  """The text between ``<!-- begin: name -->`` and ``<!-- end: name -->`` (None if absent)."""
  begin, end = _markers(name)
  i, j = text.find(begin), text.find(end)
  if i < 0 or j < i:
    return None
  return text[i + len(begin):j].strip("\n") + "\n"


def update_blocks(path: str, blocks: Mapping[str, str]) -> list[str]:
  """Rewrites the generated blocks of a markdown file that it marks; returns their names."""
  with open(path) as f:
    text = f.read()
  found = []
  for name, body in blocks.items():
    begin, end = _markers(name)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
      continue
    text = text[:i + len(begin)] + "\n" + body.strip("\n") + "\n" + text[j:]
    found.append(name)
  with open(path, "w") as f:
    f.write(text)
  return found


def stamp_blocks(docs: str) -> dict[str, str]:
  """``{"stamp <path>": stamp}`` for every figure ``<path>.png`` under ``docs`` with its stamp
  ``<path>.txt`` beside it (``<path>`` relative to ``docs``): the captions the docs show."""
  blocks = {}
  for folder, _, files in sorted(os.walk(docs)):
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext == ".txt" and stem + ".png" in files:
        with open(os.path.join(folder, name)) as f:
          rel = os.path.relpath(os.path.join(folder, stem), docs).replace(os.sep, "/")
          blocks[f"stamp {rel}"] = f"Stamp: {f.read().strip()}\n"
  return blocks


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m benchmarks.grid DOC.md ...``: rewrites the figure-stamp blocks of the docs
  (``<!-- begin: stamp figures/<name> -->``) from the stamps beside the figures in docs/."""
  import argparse

  parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
  parser.add_argument("docs", nargs="+")
  parser.add_argument("--root", default="docs", help="folder the stamp names are relative to")
  args = parser.parse_args(argv)
  blocks = stamp_blocks(args.root)
  for doc in args.docs:
    print(doc, update_blocks(doc, blocks))


if __name__ == "__main__":
  main()
