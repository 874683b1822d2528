"""EmerFlow's options: which combinations exist, checked before a run starts.

Which ``meta`` options combine (``check`` raises on anything else):

- where meta-tasks come from: old items of the main backbone (default when
  ``rule_holdout = holdout_fraction = 0``; ``crossfit_folds > 1`` then starts
  them from out-of-fold mapper outputs), items held out of main's pretraining
  (``holdout_fraction > 0``), or items held out of an auxiliary backbone
  (``rule_holdout > 0``, the common default; only ``emerflow_meta.RULE_PARAMS``
  carry over, so ``train_init`` must be off);
- ``phase_alpha`` needs ``tasks="flow"``; ``cold_in_outer`` needs
  ``learn_shrink`` (nothing else changes the cold phase);
- ``support_rows`` is read by chunk tasks only (flow tasks use ``data.k``);
- ``regen.step_scales`` are positive factors that hold 1.0 (``()`` turns the
  step-size CV off), ``regen.scale_phases`` letters of "abc",
  ``regen.forward_phases`` letters of "bc" (and needs step scales), and
  ``regen.scale_folds`` at least 2; ``regen.keep_*`` lie in [0, 1];
  ``regen.keep_cv`` shares lie in [0, 1) and replace ``regen.keep_*`` (which
  must then be 1), with ``regen.keep_folds`` at least 2.
"""

from __future__ import annotations

import ml_collections

from emerflow_jax import protocol


def regen_keep(config: ml_collections.ConfigDict) -> tuple[float, float, float]:
  """Per warm phase, the share of an item's adapted embedding kept (``regen``).

  Args:
    config: the run config.

  Returns:
    (keep_a, keep_b, keep_c), each in [0, 1].
  """
  keep = tuple(float(config.regen[f"keep_{p[-1]}"]) for p in protocol.WARM_PHASES)
  if not all(0.0 <= k <= 1.0 for k in keep):
    raise ValueError(f"regen.keep_* must be in [0, 1], got {keep}")
  return keep


def check(config: ml_collections.ConfigDict) -> None:
  """Raises on option combinations where an option would have no effect.

  Args:
    config: the run config (``meta`` and ``regen``).

  Raises:
    ValueError: naming the option and what to set instead.
  """
  m = config.meta
  if m.rule_holdout > 0 and m.train_init:
    raise ValueError("meta.rule_holdout > 0 learns the rule on an auxiliary backbone "
                     "and transfers only the step sizes; it needs meta.train_init=False")
  if m.rule_epochs and not m.rule_holdout > 0:
    raise ValueError("meta.rule_epochs sets the auxiliary backbone's pretraining, which "
                     "exists only with meta.rule_holdout > 0")
  if m.crossfit_folds > 1 and (m.rule_holdout > 0 or m.holdout_fraction > 0):
    raise ValueError("meta.crossfit_folds > 1 starts meta-tasks from out-of-fold mapper "
                     "outputs of in-sample items; with meta.rule_holdout or "
                     "meta.holdout_fraction > 0 the tasks are held out already and it "
                     "would have no effect: set meta.crossfit_folds=1")
  if m.cold_in_outer and not m.learn_shrink:
    raise ValueError("meta.cold_in_outer scores the cold phase, which only "
                     "meta.learn_shrink can change: set learn_shrink=True or turn it off")
  if m.phase_alpha and m.tasks != "flow":
    raise ValueError("meta.phase_alpha needs meta.tasks='flow'")
  g = config.regen
  scales = tuple(float(s) for s in g.step_scales)
  if scales and (1.0 not in scales or min(scales) <= 0 or len(scales) < 2):
    raise ValueError("regen.step_scales are factors of the learned step size compared "
                     f"with 1: they must be positive and hold 1.0 and another, got {scales} "
                     "(() turns the CV off)")
  if not set(str(g.forward_phases)) <= set("bc"):
    raise ValueError("regen.forward_phases takes letters of 'bc' (warm_a has no previous "
                     f"phase), got {g.forward_phases!r}")
  if g.forward_phases and not scales:
    raise ValueError("regen.forward_phases chooses among regen.step_scales, which is empty")
  if not set(str(g.scale_phases)) <= set("abc"):
    raise ValueError(f"regen.scale_phases takes letters of 'abc', got {g.scale_phases!r}")
  keeps = tuple(float(k) for k in g.keep_cv)
  if keeps and not all(0.0 <= k < 1.0 for k in keeps):
    raise ValueError("regen.keep_cv are shares of the adapted embedding tried against 1 "
                     f"(no regeneration): each must be in [0, 1), got {keeps}")
  if keeps and any(k < 1.0 for k in regen_keep(config)):
    raise ValueError("regen.keep_cv chooses each phase's share by CV; it replaces "
                     "regen.keep_a/b/c, which must then be 1")
  if keeps and int(g.keep_folds) < 2:
    raise ValueError(f"regen.keep_folds must be at least 2, got {g.keep_folds}")
  if scales and int(g.scale_folds) < 2:
    raise ValueError(f"regen.scale_folds must be at least 2, got {g.scale_folds}")
