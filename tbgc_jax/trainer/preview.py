r"""Writes PNG grids of what the model is fed, per task and per augmentation branch.

Usage:
  python -m tbgc_jax.trainer.preview --config path/to/config.py --out DIR [--num 8] [--seed 0]

The config file's ``get_config()`` returns a ``ConfigDict`` with a ``data`` section
(``tbgc_jax.data.configs``). Output: ``DIR/{task}_branch{b}.png`` (training augmentation,
branch ``b`` forced, at epoch 0) and ``DIR/{task}_eval.png`` (evaluation transform), for
every registered task the data section has (``tbgc_jax.data.preview.write_previews``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tbgc_jax.data.preview import load_config, write_previews
from tbgc_jax.tasks import get_task, task_names


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="config file with get_config() -> .data")
  p.add_argument("--out", required=True, help="output folder for the PNG grids")
  p.add_argument("--num", type=int, default=8, help="examples per grid")
  p.add_argument("--seed", type=int, default=0, help="augmentation seed")
  args = p.parse_args(argv)
  cfg = load_config(args.config)
  specs = {t: get_task(t).data for t in task_names()}
  for path in write_previews(cfg.data, specs, args.out, args.num, args.seed):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
