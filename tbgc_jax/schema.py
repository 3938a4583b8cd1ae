"""The facts the data, models, metrics and trainer share; nothing here imports anything.

- ``TASKS``: the trainer's tasks, in their fixed order (seeds and default lists follow it):
  detection, semantic segmentation, classification.
- ``IGNORE_LABEL``: the id of segmentation pixels that carry no class (BDD100K's 255): never a
  target, never counted, and the fill of label maps where no image pixel lands.
"""

TASKS = ("det", "seg", "cls")
IGNORE_LABEL = 255
