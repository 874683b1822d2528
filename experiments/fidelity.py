r"""Writes the fidelity table: our `:peer` runs against DESIGN §9's reference numbers.

  python -m experiments.fidelity --runs=/tmp/peer/base_deepfm,/tmp/peer/cvar_deepfm \
      --out=/tmp/peer/fidelity.md [--results_md=RESULTS.md]

Each ``--runs`` entry is a workdir of
``python -m experiments.run --config=experiments/configs/movielens100k.py:peer ...``
(or its results.json).  Writes ``--out`` (one Markdown table per phase) and,
with ``--results_md``, replaces that file's ``fidelity`` section.
"""

import os
import pathlib

from absl import app, flags, logging

from emerflow_jax import fidelity, report

_RUNS = flags.DEFINE_list("runs", None, "Run workdirs or results.json files.")
_OUT = flags.DEFINE_string("out", None, "Markdown file to write.")
_RESULTS_MD = flags.DEFINE_string("results_md", "", "Also write the 'fidelity' "
                                  "section of this file.")
_TOL = flags.DEFINE_float("tolerance", fidelity.TOLERANCE, "Largest |ours - reference|.")
flags.mark_flags_as_required(["runs", "out"])


def main(argv):
  del argv
  rows = fidelity.compare(fidelity.load_runs(_RUNS.value), tolerance=_TOL.value)
  section = fidelity.fidelity_section(rows, tolerance=_TOL.value)
  head = report.code_version()
  runs = ",".join(os.path.basename(os.path.normpath(r)) for r in _RUNS.value)
  title, rest = section.split("\n", 1)
  section = (f"{title}\n\nWritten by `python -m experiments.fidelity --runs={runs} "
             f"--results_md=RESULTS.md` at commit `{head}` (each run: `python -m "
             "experiments.run --config=experiments/configs/movielens100k.py:peer "
             "--config.method=<method> --config.backbone=<backbone> --config.seeds=3`)."
             f"\n{rest}")
  pathlib.Path(_OUT.value).write_text(section + "\n")
  if _RESULTS_MD.value:
    report.update_results_md(_RESULTS_MD.value, "fidelity", section)
  logging.info("wrote %s (%d rows)", _OUT.value, len(rows))


if __name__ == "__main__":
  app.run(main)
