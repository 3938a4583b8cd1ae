"""One training run per workdir: ``<workdir>/train.lock``, naming its holder.

The lock file is created atomically with its content (written to a private file, then
``os.link``-ed to the lock's name, which fails if the name exists), so a reader never sees
a half-written lock. It holds the holder's host, pid, the pid's start time (to tell a
reused pid apart) and the run's start time. A lock whose holder is on this host and no
longer running (killed with SIGKILL, the machine rebooted) is stale: the next run takes it
over, by renaming the stale file away (one rename wins) and creating its own. A lock held
from another host cannot be checked; the refusal says how to remove it. Readers of finished
checkpoints (``eval.py``) never look at the lock.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with WorkdirLock(d) as lock:
...   try:
...     WorkdirLock(d, reentrant=False).acquire()
...   except LockHeld as e:
...     print("refused:", "held by pid" in str(e))
refused: True
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time

_log = logging.getLogger(__name__)
LOCK_NAME = "train.lock"


class LockHeld(RuntimeError):
  """Another live run holds the workdir's lock."""


def _pid_start(pid: int) -> str | None:
  """The start time of process ``pid`` (clock ticks since boot, from /proc), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  """Whether ``pid`` runs on this host and is the process that started at ``start``."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process: alive
  now = _pid_start(pid)
  return start is None or now is None or now == start


class WorkdirLock:
  """The lock of one workdir, held from `acquire` to `release` (or as a context manager).

  Args:
    workdir: the run's directory (created if missing).
    enabled: False makes every method a no-op (processes other than 0 of a multi-process
      run: process 0 holds the lock for the group).
    reentrant: a lock this very process holds already counts as acquired (``train.py``
      takes it before ``train_and_evaluate`` takes it again).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, reentrant: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.enabled = enabled
    self.reentrant = reentrant
    self._owned = False
    self._me = {"host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _pid_start(os.getpid())}

  def holder(self) -> dict | None:
    """The lock file's content, or None when there is none; ``{}`` if it is unreadable."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _mine(self, info: dict | None) -> bool:
    return bool(info) and all(info.get(k) == v for k, v in self._me.items())

  def _stale(self, info: dict) -> bool:
    if not info:  # unreadable: written by no version of this code, or emptied
      return False
    return (info.get("host") == self._me["host"]
            and not _alive(int(info.get("pid", -1)), info.get("pid_start")))

  def acquire(self) -> WorkdirLock:
    """Takes the lock, or raises `LockHeld` naming the holder (host, pid, start time)."""
    if not self.enabled:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    info = {**self._me, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)}
    private = f"{self.path}.{self._me['host']}.{os.getpid()}"
    with open(private, "w") as f:
      json.dump(info, f)
    try:
      for _ in range(3):
        try:
          os.link(private, self.path)
          self._owned = True
          return self
        except FileExistsError:
          pass
        held = self.holder()
        if held is None:
          continue  # released meanwhile
        if self._mine(held) and self.reentrant:
          return self
        if not self._stale(held):
          raise LockHeld(_held_message(self.path, held))
        self._take_over(held)
      raise LockHeld(f"{self.path}: could not take the lock (other runs are starting in this "
                     "workdir at the same time)")
    finally:
      os.remove(private)

  def _take_over(self, stale: dict) -> None:
    """Moves a stale lock aside, checking that what was moved is that stale lock."""
    aside = f"{self.path}.stale.{self._me['host']}.{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # another starting run moved it first
    try:
      with open(aside) as f:
        moved = json.load(f)
    except ValueError:
      moved = {}
    if moved != stale:  # another run's fresh lock: put it back, unless a third took the name
      with contextlib.suppress(FileExistsError):
        os.link(aside, self.path)
      os.remove(aside)
      raise LockHeld(_held_message(self.path, moved))
    os.remove(aside)
    _log.warning("%s: took over the lock of a run that is gone (host %s, pid %s, started %s)",
                 self.path, stale.get("host"), stale.get("pid"), stale.get("started"))

  def release(self) -> None:
    """Removes the lock file if this process holds it."""
    if self._owned and self._mine(self.holder()):
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
    self._owned = False

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _held_message(path: str, held: dict) -> str:
  where = (f"held by pid {held.get('pid')} on host {held.get('host')}, started "
           f"{held.get('started')}" if held else "held (unreadable lock file)")
  return (f"another run is training in {os.path.dirname(path)}: {where}. Wait for it to end "
          f"or stop it; if it is gone (another host, or a reused pid), delete {path}")
