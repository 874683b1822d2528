"""The library's imports read top-down along the data flow.

data -> protocol -> backbone -> align -> meta -> warm-up -> metrics, then the
harness (methods, the methods themselves, train, the grids): a module may
import one of its own layer or an earlier one, never a later one.  Shared
utilities (checkpoints, devices, curves, cache keys, search spaces, cached
compiled programs) sit below everything and import no layer.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "emerflow_jax"
LAYERS = (
    ("utility", ("checkpoint", "sharding", "curves", "cache", "space", "programs")),
    ("data", ("data", "enrich")),
    ("protocol", ("protocol", "tasks")),
    ("backbone", ("models", "pretrain")),
    ("align", ("align", "closedform", "prior")),
    ("meta", ("meta", "rule", "rank_loss")),
    ("warm-up", ("warmup", "posterior")),
    ("metrics", ("metrics", "results", "stats", "align_diagnostics")),
)
HARNESS = len(LAYERS)  # everything not listed: methods, baselines, train, grids


def layer_of(module: str) -> int:
  """Layer index of a dotted module name under ``emerflow_jax``."""
  head = module.split(".")[1] if module.count(".") else ""
  for i, (_, names) in enumerate(LAYERS):
    if head in names:
      return i
  return HARNESS


def module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imports(path: pathlib.Path) -> set[str]:
  """Every emerflow_jax module ``path`` imports (function-level imports too)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("emerflow_jax")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("emerflow_jax"):
      for a in node.names:  # ``from emerflow_jax import align``: the module is align
        sub = f"{node.module}.{a.name}"
        out.add(sub if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                or (ROOT.parent / sub.replace(".", "/")).is_dir() else node.module)
  return out


def graph() -> dict[str, set[str]]:
  return {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


def layer_name(module: str) -> str:
  i = layer_of(module)
  return LAYERS[i][0] if i < HARNESS else "harness"


def violations(g: dict[str, set[str]]) -> list[str]:
  """"m (layer) imports d (later layer)" for every backward edge of ``g``."""
  return [f"{m} ({layer_name(m)}) imports {d} ({layer_name(d)})"
          for m, deps in sorted(g.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]


def test_no_module_imports_a_later_layer():
  g = graph()
  assert len(g) > 40  # the walk found the library
  assert "emerflow_jax.warmup" in g["emerflow_jax.methods"]  # and read its imports
  bad = violations(g)
  assert not bad, "\n".join(bad)


def test_the_check_sees_a_backward_import():
  g = {"emerflow_jax.meta": {"emerflow_jax.warmup"},
       "emerflow_jax.align": {"emerflow_jax.metrics", "emerflow_jax.models.backbones"},
       "emerflow_jax.train": {"emerflow_jax.align"}}
  assert violations(g) == ["emerflow_jax.align (align) imports emerflow_jax.metrics (metrics)",
                           "emerflow_jax.meta (meta) imports emerflow_jax.warmup (warm-up)"]
