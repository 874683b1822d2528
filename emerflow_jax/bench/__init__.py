"""Speed of EmerFlow's meta-training step next to per-task loops and PyTorch.

``run_benchmark`` times the real step (``meta.make_train_step``, the one
``emerflow.run_meta_training`` uses) on packed item tasks of a synthetic world
with MovieLens-1M shapes, side by side with three other implementations of
the same math, in one process:

* ``jax_vmap_jit``: ours, one jitted program for the whole batch of tasks;
* ``jax_task_loop``: the same ``meta.task_loss`` + grad, jitted per task and
  called in a Python loop over tasks, then the outer Adam update;
* ``torch_task_loop``: PyTorch the way the public code bases (EmerG, MetaEmb
  in CVAR) do it: a loop over tasks, inner steps by
  ``torch.autograd.grad(..., create_graph=True)``, ``backward`` per task;
* ``torch_func_vmap``: ``torch.func.grad`` inside ``torch.func.vmap`` over
  tasks, the best PyTorch offers.

Before anything is timed, every implementation must give the same outer loss
and meta-gradients on one batch (``check_agreement``), or ``AgreementError``
is raised.  torch is optional: without it the torch cases are skipped and the
reports say so.  ``write_reports`` turns the result into bench.json (DESIGN
§8), bench.md and bench.png.

Modules: ``core`` (world, JAX implementations, agreement, timing, the run),
``torch_impl`` (the PyTorch references) and ``report`` (the three reports).
Their public names are re-exported here: ``bench.run_benchmark`` etc.
"""

# pylint: disable=g-importing-member
from emerflow_jax.bench.core import (
    EMERG_TASKS_PER_S, IMPLS, LOOP_IMPLS, TINY, TINY_SHAPES, AgreementError,
    JaxTaskLoop, JaxVmapJit, Options, Shapes, World, bench_meta_config,
    check_agreement, describe_variant, device_info, flatten, make_impls,
    make_world, memory, op_kinds, profile_step, read_e2e, run_benchmark,
    run_scaling, scaling_main, task_batch, time_adapt, time_impl, time_runs,
    torch_version, trace_ops)
from emerflow_jax.bench.report import markdown, plot, write_reports
from emerflow_jax.bench.torch_impl import (
    TorchFuncVmap, TorchTaskLoop, choose_torch_threads)
