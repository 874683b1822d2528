"""Speed of EmerFlow's default meta-step next to per-task loops and PyTorch.

``run_benchmark`` times the step a run takes (``meta.make_train_step`` with
the run's ``meta.MetaConfig``: flow tasks of P phases x T second-order inner
steps, per-phase step sizes, the pooled pairwise outer loss) on flow tasks
of a synthetic world with MovieLens shapes, side by side with three other
implementations of the same step, in one process:

* ``jax_vmap_jit``: ours, one jitted program for the whole batch of tasks;
* ``jax_task_loop``: jitted per-task forward and backward passes called in a
  Python loop (the pooled loss couples the tasks), then the same Adam update;
* ``torch_task_loop``: PyTorch the way the public code bases (EmerG, MetaEmb
  in CVAR) do it: a loop over tasks, inner steps by
  ``torch.autograd.grad(..., create_graph=True)``, one backward pass;
* ``torch_func_vmap``: ``torch.func.grad`` inside ``torch.func.vmap`` over
  tasks, the best PyTorch offers.

Before anything is timed, every implementation must give the same outer loss
and meta-gradients on one batch (``check_agreement``), or ``AgreementError``
is raised.  torch is optional: without it the torch cases are skipped and the
reports say so.  ``write_reports`` turns the result into bench.json (DESIGN
§8), bench.md and bench.png.

Modules, along the data flow: ``world`` (data, backbone, tasks),
``jax_impl`` and ``torch_impl`` (the implementations, the agreement check),
``timing`` (timing, memory, profile), ``scaling`` (forced-device
subprocesses), ``benchmark`` (options and the run), ``report``.
"""

# pylint: disable=g-importing-member
from emerflow_jax.bench.benchmark import (
    EMERG_TASKS_PER_S, IMPLS, LOOP_IMPLS, Options, describe_variant,
    options_from_config, read_e2e, run_benchmark)
from emerflow_jax.bench.jax_impl import (
    AgreementError, JaxTaskLoop, JaxVmapJit, check_agreement, make_impls,
    torch_version)
from emerflow_jax.bench.report import markdown, plot, write_reports
from emerflow_jax.bench.scaling import run_scaling, scaling_main
from emerflow_jax.bench.timing import (
    device_info, memory, op_kinds, profile_step, time_adapt, time_impl, time_runs,
    trace_ops)
from emerflow_jax.bench.torch_impl import (
    TorchFuncVmap, TorchTaskLoop, choose_torch_threads)
from emerflow_jax.bench.world import (
    Shapes, World, auc_partners, bench_meta_config, flatten, make_world, step_key,
    task_batch)
