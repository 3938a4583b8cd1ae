"""Top-1 accuracy for the classification task, accumulated on the host over eval batches."""

from collections.abc import Iterable, Mapping

import numpy as np


def top1_counts(pred_label, label, valid=None) -> tuple[int, int]:
  """Number of correct predictions and of counted examples in one batch.

  Args:
    pred_label: ``[B]`` predicted class ids.
    label: ``[B]`` true class ids.
    valid: ``[B]`` bool, False for padding examples (not counted); None counts all.

  Returns:
    ``(correct, count)``.
  """
  pred_label = np.asarray(pred_label)
  label = np.asarray(label)
  if pred_label.shape != label.shape:
    raise ValueError(f"top1: predictions {pred_label.shape} and labels {label.shape} differ")
  valid = np.ones(label.shape, bool) if valid is None else np.asarray(valid, bool)
  return int(np.sum((pred_label == label) & valid)), int(np.sum(valid))


class Top1Accuracy:
  """Accumulates top-1 accuracy over batches (``update`` per batch, then ``result``).

  Examples:
    >>> acc = Top1Accuracy()
    >>> acc.update({"label": np.array([1, 2, 0])},
    ...            {"label": np.array([1, 0, 5]), "valid": np.array([True, True, False])})
    >>> acc.result()
    0.5
  """

  def __init__(self):
    self.correct = 0
    self.count = 0

  def update(self, predictions: Mapping, batch: Mapping) -> None:
    """Adds one batch: ``predictions["label"]`` against ``batch["label"]``, ``batch["valid"]``."""
    correct, count = top1_counts(predictions["label"], batch["label"], batch.get("valid"))
    self.correct += correct
    self.count += count

  def result(self) -> float:
    """Accuracy in [0, 1] over all counted examples.

    Raises:
      ValueError: if no valid example was seen.
    """
    if self.count == 0:
      raise ValueError("top1: no valid examples were evaluated")
    return self.correct / self.count


def top1_accuracy(pairs: Iterable[tuple[Mapping, Mapping]]) -> float:
  """Top-1 accuracy over ``(predictions, batch)`` pairs."""
  acc = Top1Accuracy()
  for predictions, batch in pairs:
    acc.update(predictions, batch)
  return acc.result()
