"""Process groups for one cell: submitit's task environment -> torch.distributed -> megatron's parallel state.

One code path for every multi-process case: inside a submitit job with several tasks (local executor processes or
Slurm tasks, one node or many) the rendezvous comes from `submitit.helpers.TorchDistributedEnvironment`. Anything
else (a plain script, a test, a one-task job) gets a one-process group. gloo on CPU, NCCL on GPU. The layout is
TP x PP x DP with DP = world / (TP x PP), megatron's default rank order (TP fastest).

The CPU shims (kislurm.train.cpu_shims) are applied here, before megatron is seeded, so model code never sees them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from kislurm.plan.presets import ModelPreset
from kislurm.train.cpu_shims import apply_cpu_shims
from kislurm.errors import TrainError  # noqa: F401 (re-exported)


T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the cell's layout."""

    rank: int
    world_size: int
    tp: int
    dp: int
    dp_rank: int
    tp_rank: int
    local_rank: int
    device: torch.device
    is_main: bool
    owns_process_group: bool = True
    """False when the caller had already initialised torch.distributed (teardown then leaves it alone)."""


def in_submitit_job() -> bool:
    """Whether this process is a task of a submitit job (local executor or Slurm)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


MASTER_PORTS = (20000, 32767)
"""Where a cell's rendezvous port is drawn from when MASTER_PORT is not set: below Linux's default ephemeral range
(32768-60999). submitit draws from 20000-60000, and a port that an outgoing connection holds (gloo's, NCCL's, any
client's) cannot be listened on even with SO_REUSEADDR: rank 0 then fails to bind and the cell fails at start-up."""


def master_port(job_id: str) -> int:
    """The cell's rendezvous port, the same on every rank of the job (and after a requeue, which keeps the id)."""
    return random.Random(job_id).randint(*MASTER_PORTS)


def _submitit_rendezvous() -> tuple[int, int, int, int] | None:
    """(rank, world, local_rank, local_world) exported for env:// init, or None for a one-task job."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return None
    os.environ.setdefault("MASTER_PORT", str(master_port(env.job_id)))  # an operator's MASTER_PORT wins
    tde = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return tde.rank, tde.world_size, tde.local_rank, tde.local_world_size


def job_rank() -> int:
    """This process's rank in its job, known before (and without) a process group: submitit's task number."""
    if not in_submitit_job():
        return 0
    import submitit

    return submitit.JobEnvironment().global_rank


def check_device(device: str) -> None:
    """A GPU cell on a machine without a usable GPU is a configuration error, not a crash later on."""
    if device == "gpu" and not torch.cuda.is_available():
        raise TrainError("model preset has device: gpu but no CUDA GPU is visible here; fix: run it on a GPU node "
                         "(executor gpus_per_node) or use a CPU preset (cpu-*) / device: cpu")


def _set_threads(local_world: int) -> None:
    """Ranks sharing a node split its cores (one thread each when two ranks share two cores); an explicit budget
    (Slurm's cpus-per-task, or OMP_NUM_THREADS set by kislurm's local executor for concurrent cells) wins."""
    per_task = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("OMP_NUM_THREADS")
    cores = int(per_task) if per_task else max(1, len(os.sched_getaffinity(0)) // max(1, local_world))
    torch.set_num_threads(max(1, cores))


def init_process_group(device: str = "cpu") -> tuple[int, int, int, int, bool]:
    """Join (or create) the cell's process group; returns rank, world, local_rank, local_world, owned."""
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        return rank, world, local, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), False
    backend = "nccl" if device == "gpu" else "gloo"
    found = _submitit_rendezvous() if in_submitit_job() else None
    if found is None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1, 0, 1, True
    rank, world, local, local_world = found
    if device == "gpu":
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    return rank, world, local, local_world, True


def init_model_parallel(tp: int = 1, pp: int = 1, device: str = "cpu",
                        expected_world: int | None = None) -> DistContext:
    """Set up torch.distributed and megatron's TP/PP/DP groups for this process; returns its DistContext."""
    check_device(device)
    if device == "cpu":
        apply_cpu_shims()
    rank, world, local, local_world, owned = init_process_group(device)
    if device == "cpu" and (local_world > 1 or "SLURM_CPUS_PER_TASK" in os.environ):
        _set_threads(local_world)
    if expected_world is not None and world != expected_world:
        _abort(owned)
        raise TrainError(f"this cell's layout needs {expected_world} ranks (TP x PP x DP) but the job has {world}; "
                         f"fix: launch it with {expected_world} tasks (kislurm submit does this)")
    if world % (tp * pp) != 0:
        _abort(owned)
        raise TrainError(f"world size {world} is not a multiple of TP x PP = {tp * pp}; fix: launch a multiple "
                         f"of {tp * pp} tasks or change tensor_parallel")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")
    return DistContext(
        rank=rank, world_size=world, tp=tp, dp=world // (tp * pp),
        dp_rank=parallel_state.get_data_parallel_rank(), tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        local_rank=local, device=dev, is_main=rank == 0, owns_process_group=owned,
    )


def setup(preset: ModelPreset) -> DistContext:
    """The layout a preset asks for (TP, PP and DP = data_parallel), checked against the job's world size."""
    return init_model_parallel(preset.tensor_parallel, preset.pipeline_parallel, preset.device,
                               expected_world=preset.world_size)


def rank0_decides(decide: Callable[[], T], what: str) -> T:
    """Rank 0 runs `decide` (a read of the shared filesystem) and broadcasts the answer; every rank returns it
    (a collective: every rank calls it at the same point).

    On NFS or Lustre two ranks reading the same folder can see different things (attribute caches, a file
    renamed a moment ago), and ranks that disagree on whether or where to resume hang in a collective or load
    different steps. An error on rank 0 is raised there and, naming it, on every other rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    box: list[Any] = [None]
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # the others must hear of it, or they would wait in the broadcast
            failure = e
            box[0] = ("error", str(e) if isinstance(e, TrainError) else f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise TrainError(f"rank 0 failed to decide {what}: {value}")
    return value


def seed_all(seed: int) -> None:
    """Seed torch's generators and megatron's named RNG streams (per-TP-rank dropout, data-parallel stream).

    Every rank seeds its default generator identically, so CPU-initialised weights are the same at any TP degree.
    """
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _abort(owned: bool) -> None:
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def teardown(ctx: DistContext | None = None) -> None:
    """Destroy megatron's groups and, if this module created it, the process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and (ctx is None or ctx.owns_process_group):
        dist.destroy_process_group()
