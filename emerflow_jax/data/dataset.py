"""The in-memory dataset every reader returns, plus small encoding helpers.

A `Dataset` is a table of (user, item, label, time) rows plus per-user and
per-item integer feature tables. Readers (one module per dataset) build it; the
protocol, the packing and the models only ever see this structure.

Field conventions:
  * every field table is int32; index 0 is reserved for padding / unknown, so
    real values start at 1;
  * a 1-D table ``[n_users]`` / ``[n_items]`` is a categorical field, a 2-D table
    ``[n, L]`` is a sequence field (title words, genres) that the backbones
    sum-pool over its non-zero entries;
  * ``user_fields`` must hold ``"user_id"`` and ``item_fields`` must hold
    ``"item_id"``: the item-ID embedding is what every warm-up method replaces.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np


class DataError(ValueError):
  """A data file is missing, malformed or inconsistent (the message says where)."""


@dataclasses.dataclass
class Dataset:
  """Interactions plus encoded side features.

  Attributes:
    name: dataset name, e.g. "movielens100k".
    item_type: what an item is, in words ("movie", "disease", "drug"); used by
      the enrichment prompts.
    users: [n] int32 user index in [0, n_users).
    items: [n] int32 item index in [0, n_items).
    labels: [n] float32 binary labels.
    times: [n] float64 ordering key (timestamps order rows; never a model input).
    user_fields: field name -> [n_users] or [n_users, L] int32 table.
    item_fields: field name -> [n_items] or [n_items, L] int32 table.
    vocab_sizes: "user/<field>" or "item/<field>" -> vocabulary size including
      the padding index 0.
    item_keys: [n_items] original item ids as strings (e.g. MovieLens movie id).
    item_raw: per item, the raw features as ``{name: text}`` (title, genres,
      year, ...): what an LLM is shown and what the raw serialization uses.
    item_vectors: optional [n_items, D] float32 "text vectors" that come with
      the dataset itself (the synthetic world), else None.
    info: free-form facts about the build (row counts dropped, seeds, ...).
  """
  name: str
  item_type: str
  users: np.ndarray
  items: np.ndarray
  labels: np.ndarray
  times: np.ndarray
  user_fields: dict[str, np.ndarray]
  item_fields: dict[str, np.ndarray]
  vocab_sizes: dict[str, int]
  item_keys: np.ndarray
  item_raw: list[dict[str, str]]
  item_vectors: np.ndarray | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def n_rows(self) -> int:
    return int(self.users.shape[0])

  @property
  def n_users(self) -> int:
    return int(self.user_fields["user_id"].shape[0])

  @property
  def n_items(self) -> int:
    return int(self.item_fields["item_id"].shape[0])

  def validate(self) -> "Dataset":
    """Checks shapes, ranges and finiteness; raises DataError naming the problem."""
    n = self.n_rows
    for arr, what in ((self.items, "items"), (self.labels, "labels"),
                      (self.times, "times")):
      if arr.shape != (n,):
        raise DataError(f"{self.name}: {what} has shape {arr.shape}, want ({n},)")
    if "user_id" not in self.user_fields or "item_id" not in self.item_fields:
      raise DataError(f"{self.name}: user_fields needs 'user_id' and item_fields "
                      "needs 'item_id'")
    if n and (self.users.min() < 0 or self.users.max() >= self.n_users):
      raise DataError(f"{self.name}: user index out of range [0, {self.n_users})")
    if n and (self.items.min() < 0 or self.items.max() >= self.n_items):
      raise DataError(f"{self.name}: item index out of range [0, {self.n_items})")
    if not np.all(np.isin(self.labels, (0.0, 1.0))):
      raise DataError(f"{self.name}: labels must be 0 or 1")
    if not np.all(np.isfinite(self.times)):
      raise DataError(f"{self.name}: non-finite times")
    for side, tables, rows in (("user", self.user_fields, self.n_users),
                               ("item", self.item_fields, self.n_items)):
      for field, table in tables.items():
        key = f"{side}/{field}"
        if table.shape[0] != rows:
          raise DataError(f"{self.name}: {key} has {table.shape[0]} rows, want {rows}")
        if key not in self.vocab_sizes:
          raise DataError(f"{self.name}: no vocab size for {key}")
        if table.size and (table.min() < 0 or table.max() >= self.vocab_sizes[key]):
          raise DataError(f"{self.name}: {key} values outside [0, {self.vocab_sizes[key]})")
    if len(self.item_raw) != self.n_items or len(self.item_keys) != self.n_items:
      raise DataError(f"{self.name}: item_raw/item_keys must have one entry per item")
    if self.item_vectors is not None:
      if self.item_vectors.shape[0] != self.n_items:
        raise DataError(f"{self.name}: item_vectors has {self.item_vectors.shape[0]} "
                        f"rows, want {self.n_items}")
      if not np.all(np.isfinite(self.item_vectors)):
        raise DataError(f"{self.name}: item_vectors has NaN or inf")
    return self


def encode_categorical(values: Sequence[Any]) -> tuple[np.ndarray, dict[Any, int]]:
  """Maps values to 1..V in order of first sorted appearance (0 stays padding).

  Returns:
    codes: [len(values)] int32, vocab: value -> code.
  """
  vocab = {v: i + 1 for i, v in enumerate(sorted(set(values), key=str))}
  return np.asarray([vocab[v] for v in values], np.int32), vocab


def encode_sequences(seqs: Sequence[Sequence[Any]], max_len: int,
                     min_count: int = 1) -> tuple[np.ndarray, dict[Any, int]]:
  """Encodes token lists to a [n, max_len] int32 array padded with 0.

  Tokens seen fewer than ``min_count`` times map to 0 (dropped) so rare words do
  not become one-off embeddings.

  Args:
    seqs: n token lists (any hashable tokens).
    max_len: width of the output; longer lists are cut after their first
      ``max_len`` kept tokens.
    min_count: fewest occurrences (over all lists) for a token to be kept.

  Returns:
    codes: [n, max_len] int32, kept tokens coded 1..V in sorted order, 0
    padding; vocab: token -> code.
  """
  counts: dict[Any, int] = {}
  for s in seqs:
    for t in s:
      counts[t] = counts.get(t, 0) + 1
  kept = sorted((t for t, c in counts.items() if c >= min_count), key=str)
  vocab = {t: i + 1 for i, t in enumerate(kept)}
  out = np.zeros((len(seqs), max_len), np.int32)
  for i, s in enumerate(seqs):
    codes = [vocab[t] for t in s if t in vocab][:max_len]
    out[i, :len(codes)] = codes
  return out, vocab


_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
  """Lower-case alphanumeric word tokens."""
  return _WORD.findall(text.lower())


def bucketize(values: np.ndarray, n_buckets: int) -> np.ndarray:
  """Quantile buckets 1..n_buckets for a float array; NaN -> 0 (unknown).

  Args:
    values: a float array of any shape; non-finite entries are unknown.
    n_buckets: the number of quantile buckets (fewer when quantiles tie).

  Returns:
    int32 codes of ``values``'s shape: 1..n_buckets, 0 where not finite.
  """
  values = np.asarray(values, np.float64)
  out = np.zeros(values.shape, np.int32)
  ok = np.isfinite(values)
  if ok.any():
    edges = np.unique(np.quantile(values[ok], np.linspace(0, 1, n_buckets + 1)[1:-1]))
    out[ok] = np.searchsorted(edges, values[ok], side="right") + 1
  return out
