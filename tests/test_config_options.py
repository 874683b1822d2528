"""Every option of the shared config takes effect, or a plan refuses it.

For every leaf of ``experiments/configs/common.py``'s ``base_config``:

1. some code under emerflow_jax/ or experiments/ (the config files aside)
   reads it from its section: ``<section>.<field>``, through an alias of the
   section (``m = config.meta`` ... ``m.field``), ``get("<field>")`` /
   ``["<field>"]`` in a module about that section, or an f-string key
   (``regen[f"keep_{p}"]``);
2. changing it changes the cache key of at least one artifact (a pretrained
   backbone or a seed's result) of at least one registered method's plan, or
   makes a plan raise.

``EXCEPTIONS`` lists the leaves excused from 2, each with its reason.
"""

import io
import pathlib
import re
import tokenize

import ml_collections
import pytest

from emerflow_jax import cache, methods, train
from experiments.configs import common
from experiments.configs import synthetic as synthetic_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def code_only(src: str) -> str:
  """``src`` with comments and prose strings blanked: only code can read an option.

  Identifier-like strings (``get("kind")``) and f-strings (``[f"keep_{p}"]``)
  stay; docstrings and messages naming an option do not count as reading it.
  """
  lines = src.splitlines(keepends=True)
  starts = [0]
  for line in lines:
    starts.append(starts[-1] + len(line))
  out = list(src)
  for tok in tokenize.generate_tokens(io.StringIO(src).readline):
    prose = tok.type == tokenize.STRING and not (
        re.fullmatch(r"[\"'][A-Za-z_]\w*[\"']", tok.string) or tok.string[0] in "fF")
    if tok.type == tokenize.COMMENT or prose:
      a = starts[tok.start[0] - 1] + tok.start[1]
      b = starts[tok.end[0] - 1] + tok.end[1]
      out[a:b] = [c if c == "\n" else " " for c in out[a:b]]
  return "".join(out)


SOURCES = {p: code_only(p.read_text()) for p in sorted((REPO / "emerflow_jax").rglob("*.py"))
           + sorted((REPO / "experiments").rglob("*.py")) if "configs" not in p.parts}
PATHS = "locates files only: artifacts are the same wherever they live (cache.PATH_FIELDS)"
CADENCE = ("how often a stage checkpoints: resuming is bit-exact from any checkpoint "
           "(cache.CADENCE_FIELDS; test_pretrain)")
STAGE1 = ("stage 1 (experiments.enrich) runs offline; a run reads its committed output, "
          "keyed by enrich.source")
EXCEPTIONS = {
    **{f"{s}.{f}": PATHS for s, f in cache.PATH_FIELDS},
    **{f"{s}.{f}": CADENCE for s, f in cache.CADENCE_FIELDS},
    **{f"generate.{f}": STAGE1 for f in ("llm", "threads", "device", "batch_size",
                                         "max_new_tokens")},
}


def leaves(config, prefix=()):
  """Dotted paths of every leaf (``data.options`` counts as one: reader kwargs)."""
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and name != "options":
      yield from leaves(value, prefix + (name,))
    else:
      yield ".".join(prefix + (name,))


def reader_of(leaf: str, sources=None) -> str | None:
  """A file that reads ``leaf`` from its section, or None."""
  *sections, field = leaf.split(".")
  section = sections[-1] if sections else None
  for path, src in (SOURCES if sources is None else sources).items():
    if section is None:
      heads = ["config", "cfg"]
    else:
      heads = [section] + re.findall(
          rf"^\s*(\w+)\s*=\s*(?:[\w.]+\.)?{section}\s*$", src, re.M)
    if any(re.search(rf"\b{re.escape(h)}\.{field}\b(?!\s*=[^=])", src) for h in heads):
      return str(path)
    about = section is not None and (f".{section}" in src or section in path.parts
                                     or path.stem == section)
    if about and re.search(rf"(\bget\(|\[)\s*[\"']{field}[\"']", src):
      return str(path)
    if section and any(field.startswith(m) for m in
                       re.findall(rf"{section}\[f[\"'](\w+)\{{", src)):
      return str(path)
  return None


def changed(value):
  """A different value of the same type."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  if isinstance(value, str):
    return value + "_changed"
  if isinstance(value, tuple):
    return value + (value[-1] if value else 1,)
  raise TypeError(f"no change for {value!r}")


def with_change(config, leaf):
  config = ml_collections.ConfigDict(config.to_dict())
  *sections, field = leaf.split(".")
  node = config
  for s in sections:
    node = node[s]
  if isinstance(node[field], ml_collections.ConfigDict):  # data.options
    node[field]["an_option"] = 1
  else:
    node[field] = changed(node[field])
  return config


def artifact_keys(configs, leaf=None):
  """{(method, artifact, key)} of every method's plan under its config (with
  ``leaf`` changed), or (method, "raises", ...) for a plan that raises."""
  out = set()
  for name, config in configs.items():
    if leaf is not None:
      config = with_change(config, leaf)
    try:
      plan = methods.get_method(name).plan(config)
    except (ValueError, KeyError) as e:
      out.add((name, "raises", str(e)[:60]))
      continue
    for s in range(config.seeds):
      seed = config.seed + s
      out.add((name, "result", train.result_key(config, plan, seed)))
      out |= {(name, "backbone", train.backbone_key(config, seed, spec))
              for spec in plan.backbones}
  return out


@pytest.fixture(scope="module")
def base():
  """Per registered method, the synthetic config on a backbone it runs on."""
  configs = {}
  for name in methods.REGISTRY:
    method = methods.get_method(name)
    config = synthetic_config.get_config()
    if method.backbone_kinds and config.backbone not in method.backbone_kinds:
      config.backbone = method.backbone_kinds[0]
    method.plan(config)  # runnable as configured
    configs[name] = config
  return configs, artifact_keys(configs)


ALL = sorted(leaves(common.base_config("synthetic", n_max=100, k=10)))


def test_the_config_has_the_expected_sections():
  assert len(ALL) > 100 and "align.kind" in ALL and "meta.rule_holdout" in ALL
  assert set(EXCEPTIONS) <= set(ALL)  # no stale exception


@pytest.mark.parametrize("leaf", ALL)
def test_every_option_is_read(leaf):
  assert reader_of(leaf), f"{leaf} is read nowhere: remove it or make it raise"


@pytest.mark.parametrize("leaf", [l for l in ALL if l not in EXCEPTIONS])
def test_every_option_changes_an_artifact_key_or_raises(base, leaf):
  configs, keys = base
  assert artifact_keys(configs, leaf) != keys, (
      f"{leaf}: no artifact of any plan depends on it")


@pytest.mark.parametrize("leaf", sorted(EXCEPTIONS))
def test_excused_options_really_change_no_key(base, leaf):
  configs, keys = base
  assert artifact_keys(configs, leaf) == keys


def test_the_checks_catch_an_inert_option(base):
  configs, keys = base
  assert reader_of("align.no_such_option") is None
  assert reader_of("align.kind", {pathlib.Path("x.py"): code_only(
      '"""Reads align.kind."""\n# cfg.align.kind\nraise ValueError("align.kind")\n')}) is None
  assert reader_of("align.kind", {pathlib.Path("x.py"): "y = cfg.kind\n"}) is None
  assert reader_of("meta.alpha", {pathlib.Path("x.py"): "m = config.meta\na = m.alpha\n"})
  inert = {}
  for name, config in configs.items():
    inert[name] = ml_collections.ConfigDict(config.to_dict())
    inert[name].unused = ml_collections.ConfigDict({"x": 1})  # a section no plan reads
  assert artifact_keys(inert, "unused.x") == keys
  assert artifact_keys(configs, "align.kind") != keys
