"""report: tables, own-backbone rows, and labelled RESULTS.md sections."""

from emerflow_jax import report
from experiments.configs import disgenet

PHASES = report.PHASES


def _fake_run(method, backbone, aucs, seeds=(0,), own=False):
  """A run_grid run with the given per-phase mean AUCs."""
  per = {p: [a + 0.001 * s for s in range(len(seeds))] for p, a in zip(PHASES, aucs)}
  return {"dataset": "toy", "method": method, "backbone": backbone, "label": method,
          "own_backbone": own, "seeds": list(seeds), "auc": per, "f1": per,
          "val_auc": per, "seconds": {"pretrain": 1.0, "method": 2.0, "total": 3.0},
          "counts": {"old_items": 1, "base_rows": 2, "emerging_items": 3,
                     "test_rows": 4}}


def _grid(runs, **more):
  return dict({"runs": runs, "failed": [], "unsupported": [], "read_back": [],
               "seconds": 5.0}, **more)


def test_tables_bold_the_best_and_list_where_a_baseline_beats_emerflow(tmp_path):
  runs = [_fake_run("base", "deepfm", [0.70, 0.80, 0.70, 0.70], seeds=(0, 1)),
          _fake_run("emerflow", "deepfm", [0.75, 0.75, 0.75, 0.75], seeds=(0, 1)),
          _fake_run("base", "widedeep", [0.60, 0.60, 0.60, 0.60], seeds=(0, 1))]
  grid = _grid(runs, failed=[{"method": "cvar", "backbone": "fm",
                              "error": "ValueError: x"}])
  summary = report.write_comparison(tmp_path, grid)
  beats = [(b["backbone"], b["metric"], b["phase"], b["method"])
           for b in summary["beats_reference"]]
  assert beats == [("deepfm", "auc", "warm_a", "base"), ("deepfm", "f1", "warm_a", "base")]
  md = (tmp_path / "comparison.md").read_text()
  assert "| deepfm | emerflow | **0.7505 ± 0.0005** | 0.7505 ± 0.0005 |" in md
  assert "| deepfm | base | 0.7005 ± 0.0005 | **0.8005 ± 0.0005** |" in md
  # A backbone with a single method has nothing to be best against.
  assert "| widedeep | base | 0.6005 ± 0.0005 |" in md
  assert "| deepfm | AUC | - | base | - | - |" in md
  assert "FAILED cvar with fm" in md
  assert "runs only on its own backbone" not in md
  assert (tmp_path / "comparison.png").stat().st_size > 0
  # No backbone cost recorded (older runs): the per-seed column says so.
  assert "| deepfm | base | 1 | 2 | 3 | - |" in md


def test_wall_time_per_seed_counts_every_backbone_used_even_if_cached(tmp_path):
  paid, cached = _fake_run("base", "deepfm", [0.7] * 4, seeds=(0, 1)), \
      _fake_run("emerflow", "deepfm", [0.7] * 4, seeds=(0, 1))
  paid["seconds"] = {"pretrain": 20.0, "method": 4.0, "total": 25.0, "backbones": 20.0}
  cached["seconds"] = {"pretrain": 10.0, "method": 8.0, "total": 19.0, "backbones": 30.0}
  report.write_comparison(tmp_path, _grid([paid, cached]))
  md = (tmp_path / "comparison.md").read_text()
  assert "| deepfm | base | 20 | 4 | 24 | 12.0 |" in md       # (20 + 4) / 2 seeds
  assert "| deepfm | emerflow | 10 | 8 | 18 | 19.0 |" in md   # (30 + 8) / 2 seeds


def test_an_own_backbone_method_is_listed_beside_every_backbone(tmp_path):
  runs = [_fake_run("base", "deepfm", [0.70] * 4),
          _fake_run("emerflow", "deepfm", [0.75] * 4),
          _fake_run("emerflow", "widedeep", [0.72] * 4),
          _fake_run("emerg", "emerg_gnn", [0.60, 0.60, 0.60, 0.80], own=True)]
  unsupported = [{"method": "emerg", "backbone": b, "reason": "runs only on emerg_gnn"}
                 for b in ("deepfm", "widedeep")]
  summary = report.write_comparison(tmp_path, _grid(runs, unsupported=unsupported))
  assert [(b, [report.shown(r) for r in g]) for b, g in report.by_backbone(runs)] == [
      ("deepfm", ["base", "emerflow", "emerg (emerg_gnn)"]),
      ("widedeep", ["emerflow", "emerg (emerg_gnn)"])]
  beats = [(b["backbone"], b["metric"], b["phase"], b["method"])
           for b in summary["beats_reference"]]
  assert beats == [(b, m, "warm_c", "emerg (emerg_gnn)")
                   for b in ("deepfm", "widedeep") for m in ("auc", "f1")]
  md = (tmp_path / "comparison.md").read_text()
  # In each backbone's group, and bold where it is that group's best.
  assert "| deepfm | emerg (emerg_gnn) | 0.6000 ± 0.0000 | 0.6000 ± 0.0000 | " \
      "0.6000 ± 0.0000 | **0.8000 ± 0.0000** |" in md
  assert "| widedeep | emerg (emerg_gnn) | 0.6000" in md
  assert "| widedeep | AUC | - | - | - | emerg (emerg_gnn) |" in md
  assert "not run: emerg with deepfm (runs only on emerg_gnn)" in md
  # Its wall time is counted once, on its own backbone; no "emerg_gnn" group.
  assert md.count("| emerg_gnn | emerg | 1 | 2 | 3 |") == 1
  assert "| emerg_gnn | AUC" not in md
  # A grid of own-backbone methods only still gets a table.
  alone = report.table(report.aggregate(_grid(runs[3:]))["runs"], "auc")
  assert "| emerg_gnn | emerg (emerg_gnn) | 0.6000" in alone


def test_sections_are_labelled_by_what_departs_from_the_default():
  default = disgenet.get_config()
  config = disgenet.get_config()
  config.method, config.backbone, config.seeds = "cvar", "widedeep", 5
  config.data.dir, config.optim.cache_dir = "/elsewhere", "/cache"
  assert report.section_label(config, default) == "disgenet"
  config.data.options.neg_sampling = "degree"
  assert report.section_label(config, default) == \
      "disgenet (data.options.neg_sampling=degree)"
  config.optim.epochs = 8
  assert report.section_label(config, default) == \
      "disgenet (data.options.neg_sampling=degree, optim.epochs=8)"
  smoke = disgenet.get_config("smoke")
  assert report.section_label(smoke, disgenet.get_config("smoke"), "smoke") == \
      "disgenet:smoke"


def test_two_sections_of_one_dataset_coexist_and_each_replaces_only_itself(tmp_path):
  path = tmp_path / "RESULTS.md"
  report.update_results_md(path, "movielens100k", "## movielens100k\n\nml table\n")
  summary = report.aggregate(_grid([_fake_run("base", "deepfm", [0.7] * 4)]))
  degree = "disgenet (data.options.neg_sampling=degree)"
  for label, commit in (("disgenet", "aaa"), (degree, "bbb"), ("disgenet", "ccc")):
    report.update_results_md(path, label,
                             report.results_section(summary, "cmd", commit, label))
  text = path.read_text()
  assert text.startswith("# Results") and "ml table" in text
  assert text.count("<!-- results:disgenet:begin -->") == 1
  assert text.count(f"<!-- results:{degree}:begin -->") == 1
  assert f"## {degree}: emerging-item comparison" in text
  assert "## disgenet: emerging-item comparison" in text
  # The default section was rewritten (aaa -> ccc); the degree one kept its own.
  assert "commit `aaa`" not in text and "commit `ccc`" in text and "commit `bbb`" in text
  assert text.index("movielens100k") < text.index("disgenet:begin") < text.index(degree)
