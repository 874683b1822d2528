"""bench.json, bench.md and bench.png from a ``core.run_benchmark`` result."""

from __future__ import annotations

import os
import pathlib

from emerflow_jax.bench import benchmark as core


def _fmt(x: float | None, digits: int = 0) -> str:
  if x is None:
    return "—"
  return f"{x:,.{digits}f}"


def _rate(result: dict, impl: str, tasks: int, t: int) -> float | None:
  for c in result["cases"]:
    if c["impl"] == impl and c["tasks"] == tasks and c["inner_steps"] == t:
      return c["tasks_per_s"]
  return None


_KIND_WORDS = {
    "gather": "gathers (embedding-row and feature-table lookups)",
    "scatter": "scatter-adds (gradients of those lookups)",
    "dot": "small matrix products (MLP layers, forward and backward)",
    "reduce": "reductions (FM sums, sequence pooling, losses)",
    "elementwise": "element-wise fusions"}


def _limits_text(p: dict, result: dict) -> list[str]:
  """What bounds the jax_vmap_jit step, in sentences derived from ``p``."""
  lines = [f"Profiled case: {p['tasks']} tasks, T = {p['inner_steps']}.", "",
           "| part | ms per step | share of step |", "|---|---|---|"]
  for key, what in (("loss_T0_s", "outer loss, no inner steps (T = 0)"),
                    ("loss_s", f"outer loss with T = {p['inner_steps']}"),
                    ("grad_s", "outer loss + meta-gradient"),
                    ("step_s", "full step (+ Adam update)"),
                    ("first_order_step_s", "full step, first-order")):
    lines.append(f"| {what} | {p[key] * 1e3:.1f} | {p[key] / p['step_s']:.0%} |")
  lines += ["", f"XLA cost analysis of the step: {p['flops'] / 1e9:.2f} GFLOP and "
            f"{p['bytes'] / 1e9:.2f} GB accessed per step, i.e. {p['gflop_per_s']:.1f} "
            f"GFLOP/s and {p['gbyte_per_s']:.1f} GB/s achieved "
            f"({p['flops'] / max(p['bytes'], 1):.2f} FLOP per byte)."]
  tr = p.get("trace")
  if tr:
    total = max(tr["op_ms_per_step"], 1e-9)
    wall = p["step_s"] * 1e3
    kinds = sorted(tr["by_kind"].items(), key=lambda kv: -kv[1])
    unmatched = tr.get("unattributed_ms_per_step", 0.0)
    lines += ["", f"Op time by kind (profiler trace of 3 steps): {total + unmatched:.1f} ms "
              f"of XLA op time per {wall:.1f} ms step. On a CPU, ops on parallel threads "
              "overlap, so this can exceed the wall time; on a GPU, the gap to the wall "
              "time is idle time between kernels.", "",
              "| kind | ms per step | share of op time |", "|---|---|---|"]
    lines += [f"| {k} | {ms:.1f} | {ms / (total + unmatched):.0%} |" for k, ms in kinds]
    if unmatched > 0.01 * total:
      lines.append(f"| (ops not matched to an HLO instruction) | {unmatched:.1f} | "
                   f"{unmatched / (total + unmatched):.0%} |")
    lines += ["", "Heaviest ops: " + "; ".join(
        f"`{n}` ({k}, {ms:.2f} ms)" for n, k, ms in tr["top_ops"][:5]) + "."]
    lead = "; ".join(f"{_KIND_WORDS.get(k, k)}: {ms / total:.0%}" for k, ms in kinds[:3])
    matched = "" if unmatched <= 0.01 * total else " (of the matched op time)"
    lines += ["", f"**What limits it.** Op time splits as {lead}{matched}. The meta-gradient "
              f"costs {p['grad_s'] / max(p['loss_s'], 1e-12):.1f}x the outer loss, and "
              f"each inner step adds about "
              f"{max(p['loss_s'] - p['loss_T0_s'], 0) / max(p['inner_steps'], 1) * 1e3:.1f}"
              " ms to the forward pass alone. At "
              f"{p['flops'] / max(p['bytes'], 1):.1f} FLOP per byte accessed the work is "
              "memory- and latency-bound, not compute-bound: d = 16 embeddings and a "
              "16-16 MLP give many small ops with little arithmetic each."]
  elif "trace_error" in p:
    lines += ["", f"(no op trace: {p['trace_error']})"]
  lines += _batch_size_text(result)
  return lines


def _batch_size_text(result: dict) -> list[str]:
  """How per-task throughput of jax_vmap_jit falls with the batch size (CPU)."""
  if result["info"]["platform"] != "cpu":
    return []
  drops, largest = [], 0
  for t in sorted({c["inner_steps"] for c in result["cases"]}):
    pts = sorted((c["tasks"], c["tasks_per_s"]) for c in result["cases"]
                 if c["impl"] == "jax_vmap_jit" and c["inner_steps"] == t)
    if len(pts) < 2:
      continue
    best_n, best = max(pts, key=lambda x: x[1])
    last_n, last = pts[-1]
    if last_n != best_n and last < 0.8 * best:
      drops.append(f"T = {t}: {best:,.0f} tasks/s at {best_n} tasks, {last:,.0f} at {last_n}")
      largest = max(largest, last_n)
  if not drops:
    return []
  # One [rows, fields, d] float32 activation of the whole batch.
  rows = result["phases"] * result["k"] + result["query_rows"]
  mb = largest * rows * result["n_fields"] * 16 * 4 / 2**20
  return ["", "Per-task throughput falls at large batches (" + "; ".join(drops) + "). One "
          f"[rows, fields, d] activation of a {largest}-task batch is about {mb:.0f} MB, "
          "far beyond the CPU caches, so big batches are bound by memory bandwidth (our "
          "reading, not measured directly). Running a big batch as a `lax.map` over chunks "
          "of the best size, gradients summed, should keep the best per-task rate on CPUs."]


def markdown(result: dict) -> str:
  """bench.md: tables, ratios and the profile, device next to every number."""
  dev = result["device"]
  opts = result["options"]
  impls = [i for i in core.IMPLS if any(c["impl"] == i for c in result["cases"])]
  ts = sorted({c["inner_steps"] for c in result["cases"]})
  ns = sorted({c["tasks"] for c in result["cases"]})
  loads = [c["load1"] for c in result["cases"]] + result["load"]
  sh = opts["shapes"]
  out = ["# Meta-training speed: EmerFlow (JAX) vs per-task loops and PyTorch", "",
         f"**Device: {dev}** (all numbers below; jax {result['info']['jax']}, "
         f"torch {result['torch']}). 1-minute load average during the run: "
         f"{min(loads):.1f}–{max(loads):.1f}" + (
             f", above the {result['info']['cores']} cores: the machine was shared with "
             "other jobs, so absolute rates are noisy (the implementations ran side by "
             "side in one process, under the same load; rerun on a quiet machine for "
             "final absolute numbers)." if max(loads) > result["info"]["cores"] else "."),
         "",
         f"World: ML-1M-like synthetic data ({sh['n_users']} users, {sh['n_items']} "
         f"items, 9 fields incl. title-word and genre sequences, {sh['text_dim']}-d text "
         "vectors); DeepFM d = 16, MLP (16, 16); float32. **The timed step is the "
         f"default meta-step of a run**: {result['variant']}.", "",
         f"tasks/s = tasks per meta step / median step time of {opts['repeats']} runs "
         "after a warm-up run; compile time is separate. Each task takes "
         f"{result['phases']} x T inner steps, so task-inner-steps/s = "
         f"{result['phases']} T x tasks/s. Loop implementations (marked *) time at most "
         f"{opts['loop_cap']} tasks per step and report that per-task throughput for "
         "bigger batches (their cost is linear in tasks). PyTorch cases run up to "
         f"{opts.get('torch_max_tasks') or 'every'} tasks per step (— above). With sampled "
         "pairs the PyTorch "
         "references take the JAX step's draws, made outside their timed work.", ""]
  if not str(result["torch"])[:1].isdigit():
    out += [f"PyTorch cases: {result['torch']}.", ""]
  elif result.get("torch_threads"):
    tt = result["torch_threads"]
    probe = tt.get("probe_tasks_per_s")
    line = f"PyTorch ran with {tt['threads']} intra-op thread(s)"
    if probe:
      rates = ", ".join(f"{k} thread(s): {v:.1f} tasks/s" for k, v in probe.items())
      line += f", the faster on a probe of torch_task_loop ({rates})"
    out += [line + ".", ""]
  out += ["## Agreement (checked before timing)", "",
          f"Outer loss and meta-gradients on {opts['check_tasks']} tasks, worst error "
          "relative to jax_vmap_jit (per gradient leaf: max abs diff / max abs value); "
          f"tolerance {opts['tol']:g}.", "", "| T | " + " | ".join(
              i for i in impls if i != "jax_vmap_jit") + " |",
          "|---|" + "---|" * (len(impls) - 1)]
  for t, worst in result["agreement"].items():
    out.append(f"| {t} | " + " | ".join(f"{worst.get(i, float('nan')):.1e}"
                                        for i in impls if i != "jax_vmap_jit") + " |")
  out += ["", f"## Throughput (tasks/s) on {dev}", "",
          "| T | tasks | " + " | ".join(i + ("*" if i in core.LOOP_IMPLS else "")
                                        for i in impls) + " |",
          "|---|---|" + "---|" * len(impls)]
  for t in ts:
    for n in ns:
      out.append(f"| {t} | {n} | " + " | ".join(_fmt(_rate(result, i, n, t))
                                               for i in impls) + " |")
  out += ["", f"Compile time (JAX) / first call (PyTorch, eager), seconds, on {dev}:", "",
          "| T | tasks | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
  for t in ts:
    for n in ns:
      cells = []
      for i in impls:
        c = [c for c in result["cases"] if (c["impl"], c["tasks"], c["inner_steps"]) == (i, n, t)]
        v = c[0]["compile_s"] if c and c[0]["compile_s"] is not None else (
            c[0]["first_call_s"] if c else None)
        cells.append(_fmt(v, 2))
      out.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
  lo, hi = result["emerg_tasks_per_s"]
  out += ["", f"## Ratios on {dev}", "",
          "| T | tasks | vmap / jax_task_loop | vmap / torch_task_loop | vmap / "
          "torch_func_vmap | vmap task-inner-steps/s | vs EmerG "
          f"({lo:.0f}–{hi:.0f} task-inner-steps/s, DESIGN §9) |",
          "|---|---|---|---|---|---|---|"]
  for t in ts:
    for n in ns:
      ours = _rate(result, "jax_vmap_jit", n, t)
      r = lambda other: (f"{ours / other:,.1f}x" if ours and other else "—")
      steps = ours * result["phases"] * t if ours else None
      emerg = f"{steps / hi:,.0f}x–{steps / lo:,.0f}x" if steps else "—"
      out.append(f"| {t} | {n} | {r(_rate(result, 'jax_task_loop', n, t))} | "
                 f"{r(_rate(result, 'torch_task_loop', n, t))} | "
                 f"{r(_rate(result, 'torch_func_vmap', n, t))} | {_fmt(steps)} | {emerg} |")
  out += ["", "EmerG's 38–50 tasks/s were measured with its own code on ML-100K "
          "(K = 10, one inner step per task) on a 2-core CPU; a task here takes "
          f"{result['phases']} x T inner steps, hence the comparison in "
          "task-inner-steps/s. It is indicative, not same-code."]
  if result.get("scaling"):
    s0 = result["scaling"][0]["tasks_per_s"]
    out += ["", "## Scaling over forced CPU devices", "",
            f"The sharded step (`sharding.task_mesh`, tasks split over devices) with "
            f"`--xla_force_host_platform_device_count=N`, {result['scaling'][0]['tasks']} "
            f"tasks, T = {result['scaling'][0]['inner_steps']}, one process per N, on "
            f"{result['info']['cpu']} with {result['info']['cores']} cores: virtual "
            "devices share those cores, so the speed-up is bounded by the core count.",
            "", f"| devices | tasks/s | speed-up vs {result['scaling'][0]['devices']} | compile s "
            "| load |", "|---|---|---|---|---|"]
    for s in result["scaling"]:
      out.append(f"| {s['devices']} | {s['tasks_per_s']:,.0f} | "
                 f"{s['tasks_per_s'] / s0:.2f}x | {s['compile_s']:.1f} | {s['load1']:.1f} |")
  if result.get("adapt"):
    out += ["", f"## Adaptation only (one warm-up phase) on {dev}", "",
            "`rule.adapt_items` (the jitted rule) and `emerflow_meta.refine_items` (what a run "
            "calls: the rule sharded over all devices, with host transfers), K = "
            f"{result['k']} rows per item.", "",
            "| items | T | adapt_items items/s | refine_items items/s | compile s |",
            "|---|---|---|---|---|"]
    for a in result["adapt"]:
      out.append(f"| {a['items']} | {a['inner_steps']} | {a['adapt_items_per_s']:,.0f} | "
                 f"{a['refine_items_per_s']:,.0f} | {a['compile_s']:.2f} |")
  if result.get("profile"):
    out += ["", f"## What limits jax_vmap_jit on {dev}", ""] + _limits_text(
        result["profile"], result)
  if result.get("e2e"):
    out += ["", "## End to end (seconds per seed, from each run's results.json)", "",
            "Measured by those runs, not by this benchmark: on a shared machine, compare "
            "only runs that ran at the same time.", "",
            "| run | method | backbone | seeds | pretrain s | method s | total s |",
            "|---|---|---|---|---|---|---|"]
    for e in result["e2e"]:
      sec = e["seconds"]
      out.append(f"| {e.get('path', '')} | {e['method']} | {e['backbone']} | {e['seeds']} | "
                 f"{_fmt(sec.get('pretrain'), 1)} | {_fmt(sec.get('method'), 1)} | "
                 f"{_fmt(sec.get('total'), 1)} |")
  return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> None:
  """bench.png: tasks/s vs tasks per batch, log-log, one panel per T.

  Args:
    result: the benchmark's result dict.
    path: the PNG written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ts = sorted({c["inner_steps"] for c in result["cases"]})
  fig, axes = plt.subplots(1, len(ts), figsize=(4.2 * len(ts), 4.2), squeeze=False,
                           sharey=True)
  for ax, t in zip(axes[0], ts):
    for impl in core.IMPLS:
      pts = sorted((c["tasks"], c["tasks_per_s"]) for c in result["cases"]
                   if c["impl"] == impl and c["inner_steps"] == t)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl + ("*" if impl in core.LOOP_IMPLS else ""))
    lo, hi = result["emerg_tasks_per_s"]
    ax.axhspan(lo, hi, color="grey", alpha=0.3, label="EmerG (DESIGN §9)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks per meta step")
    ax.set_title(f"T = {t} inner steps")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("tasks / s")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
  fig.suptitle(result["device"], fontsize=8)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_reports(result: dict, workdir: str) -> None:
  """Writes bench.json, bench.md and bench.png into ``workdir``.

  Args:
    result: the benchmark's result dict.
    workdir: the output folder.
  """
  from emerflow_jax import results  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  results.write_json_atomic(os.path.join(workdir, "bench.json"), result)
  with open(os.path.join(workdir, "bench.md"), "w") as f:
    f.write(markdown(result))
  plot(result, os.path.join(workdir, "bench.png"))


FINDINGS = "## Findings"


def write_keeping_findings(path: pathlib.Path, text: str) -> None:
  """Writes a generated table to ``path``, keeping the hand-written
  ``## Findings`` section (and all below it) of the file it replaces."""
  old = path.read_text() if path.exists() else ""
  notes = old[old.index(FINDINGS):] if FINDINGS in old else ""
  path.write_text(text.rstrip("\n") + "\n" + ("\n" + notes if notes else ""))
