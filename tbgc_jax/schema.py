"""The facts the data, models, metrics and trainer share; nothing here imports anything.

- ``TASKS``: the built-in tasks, in their fixed order (the default ``config.tasks``, the
  bundled embedded data): detection, semantic segmentation, classification. Their
  specifications are in ``tbgc_jax.tasks``; ``config.tasks`` accepts any registered task.
- ``IGNORE_LABEL``: the id of segmentation pixels that carry no class (BDD100K's 255): never a
  target, never counted, and the fill of label maps where no image pixel lands.
"""

TASKS = ("det", "seg", "cls")
IGNORE_LABEL = 255
