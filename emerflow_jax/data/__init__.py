"""Dataset readers. ``load_dataset(data_config)`` is the single entry point.

Each dataset reads one sub-folder of the data directory (see ``paths``):

| name          | sub-folder             | reader                          |
|---------------|------------------------|---------------------------------|
| movielens100k | movielens-100k/        | movielens.load_movielens100k    |
| movielens1m   | movielens-1m/          | movielens.load_movielens1m      |
| disgenet      | disgenet-curated-v7/   | disgenet.load_disgenet          |
| repodb        | repodb/                | repodb.load_repodb              |
| clinical_trials | clinical-trials/     | clinical_trials.load_clinical_trials |
| synthetic     | (generated)            | synthetic.make_synthetic        |
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any

from emerflow_jax.data import dataset, paths

# name -> (module, function, sub-folder or None for generated data)
READERS = {
    "movielens100k": ("movielens", "load_movielens100k", "movielens-100k"),
    "movielens1m": ("movielens", "load_movielens1m", "movielens-1m"),
    "disgenet": ("disgenet", "load_disgenet", "disgenet-curated-v7"),
    "repodb": ("repodb", "load_repodb", "repodb"),
    "clinical_trials": ("clinical_trials", "load_clinical_trials",
                        "clinical-trials"),
    "synthetic": ("synthetic", "make_synthetic", None),
}


def load_dataset(data_config: Any) -> dataset.Dataset:
  """Loads ``data_config.name`` with the options in ``data_config``.

  Args:
    data_config: a ConfigDict (or mapping) with at least ``name``; optional
      ``dir`` (data directory), ``download`` and reader-specific ``options``.

  Returns:
    A validated Dataset.
  """
  get = data_config.get
  name = get("name")
  if name not in READERS:
    raise dataset.DataError(f"unknown dataset {name!r}; known: {sorted(READERS)}")
  module_name, fn_name, sub = READERS[name]
  module = importlib.import_module(f"emerflow_jax.data.{module_name}")
  options = dict(get("options") or {})
  fn = getattr(module, fn_name)
  if sub is None:
    return fn(**options)
  folder = pathlib.Path(paths.resolve_data_dir(get("dir")), sub)
  if name.startswith("movielens"):
    options.setdefault("download", bool(get("download", True)))
  return fn(folder, **options)
