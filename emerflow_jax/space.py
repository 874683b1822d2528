"""Search spaces as data: each method declares one next to its code.

A space maps dotted config keys (``"warmup.lr"``) to parameters; a tuner turns
it into Optuna suggestions with ``suggest``, so every method is searched by
the same sampler over its own declared space.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Float:
  """A float in [low, high], sampled on a log scale if ``log``."""
  low: float
  high: float
  log: bool = False


@dataclasses.dataclass(frozen=True)
class Int:
  """An integer in [low, high] (inclusive), on a log scale if ``log``."""
  low: int
  high: int
  log: bool = False
  step: int = 1


@dataclasses.dataclass(frozen=True)
class Categorical:
  """One of ``choices``."""
  choices: Sequence[Any]


Param = Float | Int | Categorical


def suggest(trial: Any, params: Mapping[str, Param]) -> dict[str, Any]:
  """Asks an Optuna trial for one value per parameter.

  Args:
    trial: an ``optuna.trial.Trial`` (or anything with its suggest methods).
    params: dotted config key -> parameter.

  Returns:
    dotted config key -> the suggested value.
  """
  out = {}
  for name, p in params.items():
    if isinstance(p, Float):
      out[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
    elif isinstance(p, Int):
      out[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
    elif isinstance(p, Categorical):
      out[name] = trial.suggest_categorical(name, list(p.choices))
    else:
      raise TypeError(f"{name}: not a space parameter: {p!r}")
  return out
