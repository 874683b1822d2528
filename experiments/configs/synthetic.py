"""The synthetic latent-factor world (tests, scale runs, speed benchmarks).

Usage::

  python -m experiments.run --config=experiments/configs/synthetic.py:smoke \
      --config.method=base --workdir=/tmp/syn

The item "text vector" comes with the data (``enrich.source = "dataset"``).
"""

from experiments.configs import common


def get_config(arg=None):
  c = common.base_config("synthetic", n_max=100, k=10)
  c.data.options.n_users = 600     # users in the world
  c.data.options.n_items = 800     # items (power-law popularity)
  c.data.options.mean_count = 60.0 # mean rows per item
  c.data.options.seed = 0          # world seed
  c.data.download = False          # nothing to download
  c.enrich.source = "dataset"      # text vectors generated with the world
  c.optim.epochs = 5
  if arg == "smoke":
    common.smoke(c)
    c.data.options.n_users = 200
    c.data.options.n_items = 300
  return c


def get_splits(arg=None):
  """The protocol grid of the multi-split comparison (``--splits=config``)."""
  del arg
  return [{"data.n_max": 100, "data.k": 10}, {"data.n_max": 80, "data.k": 8}]
