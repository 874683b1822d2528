"""Search spaces: what a method may tune, as data, and how Optuna samples it.

A method declares its space next to its code as a mapping from dotted config
keys to parameter types, for example::

  {"warmup.lr": space.Float(1e-3, 1e-1, log=True),
   "warmup.steps": space.Int(1, 10),
   "cvar.blend": space.Categorical([0.0, 0.5, 1.0])}

``suggest(trial, params)`` turns it into one override dict for a trial; the
Optuna parameter name is the config key itself, so a study's
``best_params`` is directly a set of ``--config.<key>=<value>`` overrides.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence, Union


@dataclasses.dataclass(frozen=True)
class Float:
  """A real parameter in [low, high], sampled on a log scale if ``log``."""
  low: float
  high: float
  log: bool = False

  def __post_init__(self):
    if not self.low <= self.high:
      raise ValueError(f"Float: low={self.low} > high={self.high}")
    if self.log and self.low <= 0:
      raise ValueError(f"Float: log scale needs low > 0, got {self.low}")


@dataclasses.dataclass(frozen=True)
class Int:
  """An integer parameter in [low, high] on a grid of ``step`` (or log scale)."""
  low: int
  high: int
  log: bool = False
  step: int = 1

  def __post_init__(self):
    if not self.low <= self.high:
      raise ValueError(f"Int: low={self.low} > high={self.high}")
    if self.step < 1:
      raise ValueError(f"Int: step must be >= 1, got {self.step}")
    if self.log and (self.low < 1 or self.step != 1):
      # Optuna's own rule: a log-scale int needs low >= 1 and step 1.
      raise ValueError("Int: log scale needs low >= 1 and step == 1")


@dataclasses.dataclass(frozen=True)
class Categorical:
  """One of a fixed tuple of choices (None, bool, int, float or str)."""
  choices: tuple

  def __init__(self, choices: Sequence[Any]):
    choices = tuple(choices)
    if not choices:
      raise ValueError("Categorical: no choices")
    for c in choices:
      if c is not None and not isinstance(c, (bool, int, float, str)):
        raise ValueError(f"Categorical: choice {c!r} is not None/bool/int/float/str")
    object.__setattr__(self, "choices", choices)


Param = Union[Float, Int, Categorical]


def suggest(trial, params: Mapping[str, Param]) -> dict[str, Any]:
  """Samples one value per parameter from an Optuna trial.

  Args:
    trial: an ``optuna.Trial`` (anything with ``suggest_float/int/categorical``).
    params: dotted config key -> parameter type.

  Returns:
    Dotted config key -> the sampled value, in the order of ``params``.

  Raises:
    TypeError: for a parameter that is not a Float, Int or Categorical.
  """
  out = {}
  for key, p in params.items():
    if isinstance(p, Float):
      out[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
    elif isinstance(p, Int):
      out[key] = trial.suggest_int(key, p.low, p.high, step=p.step, log=p.log)
    elif isinstance(p, Categorical):
      out[key] = trial.suggest_categorical(key, p.choices)
    else:
      raise TypeError(f"search space {key!r}: {p!r} is not a space.Float/Int/Categorical")
  return out


def contains(p: Param, value: Any) -> bool:
  """Whether ``value`` is a point of ``p`` (a Float/Int in range, on an Int's step).

  Args:
    p: a search-space parameter.
    value: a candidate value.

  Returns:
    True when ``value`` lies in ``p``.
  """
  if isinstance(p, Categorical):
    return value in p.choices
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  if isinstance(p, Int):
    return (float(value).is_integer() and p.low <= value <= p.high
            and (value - p.low) % p.step == 0)
  return p.low <= value <= p.high


def grid_size(params: Mapping[str, Param]) -> float:
  """How many distinct points the space has (inf when any axis is real)."""
  n = 1.0
  for p in params.values():
    if isinstance(p, Float):
      if p.low < p.high:
        return math.inf
    elif isinstance(p, Int):
      n *= len(range(p.low, p.high + 1, p.step)) if not p.log else p.high - p.low + 1
    else:
      n *= len(p.choices)
  return n
