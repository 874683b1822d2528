"""Tests for the fidelity table against the reference numbers."""

import json

import numpy as np
import pytest

from emerflow_jax import fidelity, protocol


def _run(tmp_path, method, backbone, auc):
  d = tmp_path / f"{method}_{backbone}"
  d.mkdir()
  (d / "results.json").write_text(json.dumps(
      {"method": method, "backbone": backbone, "phases": list(protocol.PHASES),
       "auc": {p: v for p, v in zip(protocol.PHASES, auc)}}))
  return d


def test_compare_on_a_hand_made_case(tmp_path):
  ref = {("base", "deepfm"): (.700, .710, .720, .730),
         ("cvar", "deepfm"): (.600, .600, .600, .600)}
  runs = fidelity.load_runs([_run(tmp_path, "base", "deepfm",
                                  [[.70, .71], [.70, .72], [.73, .73], [.72, .74]]),
                             _run(tmp_path, "mwuf", "deepfm", [[.5]] * 4)])
  rows = fidelity.compare(runs, ref, tolerance=0.005)
  # Only base has both a run and a reference; one row per phase.
  assert [(r["method"], r["phase"]) for r in rows] == [("base", p) for p in protocol.PHASES]
  means = [r["mean"] for r in rows]
  np.testing.assert_allclose(means, [.705, .71, .73, .73])
  np.testing.assert_allclose(rows[0]["std"], np.std([.70, .71], ddof=1))
  np.testing.assert_allclose([r["diff"] for r in rows], [.005, 0.0, .01, 0.0], atol=1e-12)
  assert [r["within"] for r in rows] == [True, True, False, True]
  text = fidelity.fidelity_section(rows)
  assert "3 of 4" in text
  assert text.count("### ") == 4
  assert "| base | DeepFM | 0.7300 ± 0.0000 (n=2) | 0.720 | +0.0100 | no |" in text


def test_reference_numbers_are_design_section_9():
  assert fidelity.REFERENCE_AUC[("cvar", "widedeep")] == (.665, .703, .717, .712)
  assert fidelity.REFERENCE_AUC[("emerg", "emerg_gnn")] == (.687, .717, .720, .721)
  assert len(fidelity.REFERENCE_AUC) == 7


def test_two_runs_of_one_method_and_backbone_are_refused(tmp_path):
  a = _run(tmp_path, "base", "deepfm", [[.7]] * 4)
  (tmp_path / "again").mkdir()
  (tmp_path / "again" / "results.json").write_text((a / "results.json").read_text())
  with pytest.raises(ValueError, match="two runs"):
    fidelity.load_runs([a, tmp_path / "again"])
