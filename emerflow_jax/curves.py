"""Training curves as TensorBoard event files, through ``clu.metric_writers``.

As in the Flax examples: one ``metric_writers`` writer per run folder,
scalars written at integer steps, and only process 0 writes files.  Stages take an
optional writer; ``None`` writes nothing, so library code never needs one.

Tags: ``pretrain/<role>/loss`` per epoch; for every alignment (``align``,
``rule-align``, named as its stage folder) ``<stage>/fvu_train`` and
``<stage>/fvu_heldout``: per check for the MLP, and for a closed form
``<stage>/cv_fvu`` (and ``cv_<option>``) at step = CV candidate index, the
chosen fit's train and held-out FVU at its index; ``meta/...`` (losses, step
sizes) per epoch; ``val_auc/<phase>`` at step = phase index.  Open them with
``tensorboard --logdir <workdir>``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

import jax
import ml_collections


class _Prefixed:
  """A writer that prepends ``prefix/`` to every tag."""

  def __init__(self, inner: Any, prefix: str):
    self.inner, self.prefix = inner, prefix

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes ``scalars`` at ``step`` with every tag under ``prefix/``.

    Args:
      step: the step to write at.
      scalars: tag -> value.
    """
    self.inner.write_scalars(step, {f"{self.prefix}/{k}": v for k, v in scalars.items()})


@contextlib.contextmanager
def writer(config: ml_collections.ConfigDict, logdir: str | os.PathLike
           ) -> Iterator[Any]:
  """A clu writer into ``logdir`` while the block runs (None if ``eval.curves`` is off).

  Args:
    config: the run config (``eval.curves``).
    logdir: the folder of the event files.

  Yields:
    A ``clu.metric_writers`` writer, or None.
  """
  if not config.eval.curves:
    yield None
    return
  if jax.process_index() > 0:  # one host writes the files
    yield None
    return
  # TensorFlow (behind clu's SummaryWriter) is heavy: imported only when used.
  # Only the event-file writer: the stages log their own progress lines.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  w = metric_writers.SummaryWriter(os.fspath(logdir))
  try:
    yield w
  finally:
    w.flush()
    w.close()


def prefixed(w: Any, prefix: str) -> Any:
  """``w`` writing under ``prefix/`` (None stays None).

  Args:
    w: a writer from ``writer``, or None.
    prefix: the tag prefix, without the trailing slash.

  Returns:
    A writer that prepends ``prefix/`` to every tag, or None.
  """
  return None if w is None else _Prefixed(w, prefix)


def write(w: Any, step: int, scalars: Mapping[str, Any]) -> None:
  """Writes ``scalars`` at ``step`` if there is a writer (values made float).

  Args:
    w: a writer, or None (then nothing is written).
    step: the step to write at (made an int).
    scalars: tag -> scalar value (Python, NumPy or a 0-d JAX array).
  """
  if w is not None:
    w.write_scalars(int(step), {k: float(v) for k, v in scalars.items()})


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the event files under ``logdir``: tag -> [(step, value)].

  Reads the files back with TensorBoard's own event reader, so a test can
  check that a curve is really on disk.
  """
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = {}
  for root, _, files in os.walk(os.fspath(logdir)):
    if not any(f.startswith("events.out.tfevents") for f in files):
      continue
    acc = event_accumulator.EventAccumulator(
        root, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
    acc.Reload()
    for tag in acc.Tags().get("tensors", []):
      for e in acc.Tensors(tag):
        out.setdefault(tag, []).append((int(e.step), _tensor_value(e.tensor_proto)))
    for tag in acc.Tags().get("scalars", []):
      out.setdefault(tag, []).extend((int(e.step), float(e.value)) for e in acc.Scalars(tag))
  return out


def _tensor_value(proto: Any) -> float:
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  return float(tensor_util.make_ndarray(proto))
