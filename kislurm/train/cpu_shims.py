"""The few patches megatron-core 0.16 needs to run on a machine without CUDA; a no-op where CUDA is available.

megatron-core has no supported CPU path (maintainers' word, Megatron-LM issue 2715), but its pure-PyTorch layers,
gloo collectives, DDP and dist_checkpointing work once three CUDA calls are redirected (measured in
shared/megatron-cpu.md):

1. the RNG tracker reads and writes the CUDA generator (`model_parallel_cuda_manual_seed`, attention's
   `get_cuda_rng_tracker().fork()`): replaced by a tracker that keeps CPU generator states;
2. `torch.cuda.current_device()` names the device of buffers (attention's global memory buffer, TP mappings, DDP
   buckets): it returns the CPU device while CUDA is absent;
3. `torch.cuda.synchronize()` (dist_checkpointing.save): a no-op while CUDA is absent;
4. the causal mask that attention builds when given `attention_mask=None` is created with `device="cuda"`
   (`transformer.utils.get_default_causal_mask`): rebuilt on the CPU.

Everything is in this one module so the GPU path stays untouched and an upgrade that changes these internals is
caught by tests/test_model.py (which checks every shim is in effect and still needed), and importing it under a
megatron-core newer than the shims were checked against fails (kislurm.train.workarounds).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer import utils as transformer_utils

from kislurm.train.workarounds import require_megatron

_CHECKED_UPTO = "0.16.1"
for _name, _where, _what in (
    ("cpu-rng-tracker", "CpuRNGStatesTracker", "megatron's RNG tracker reads and writes the CUDA generator"),
    ("cpu-current-device", "_cpu_current_device", "megatron places buffers on torch.cuda.current_device()"),
    ("cpu-synchronize", "_no_synchronize", "dist_checkpointing.save calls torch.cuda.synchronize()"),
    ("cpu-causal-mask", "_cpu_default_causal_mask", "get_default_causal_mask builds its mask on device='cuda'"),
):
    require_megatron(_name, f"kislurm.train.cpu_shims.{_where}", _what, tested_upto=_CHECKED_UPTO)

_APPLIED = False
_ORIGINALS: dict[str, object] = {}
"""What the shims replaced (tests call these to check each shim is still needed by the installed megatron)."""


class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
    """megatron's named RNG states ('model-parallel-rng', ...) kept as CPU generator states.

    Forking swaps the CPU default generator, as the CUDA tracker swaps the CUDA one: TP ranks then draw their
    per-rank dropout masks from their own streams, and the default stream is left as it was.
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_synchronize(device: object = None) -> None:
    return None


@functools.lru_cache(maxsize=32)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """True above the diagonal (masked), as megatron's get_default_causal_mask, on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def apply_cpu_shims() -> bool:
    """Install the CPU shims once per process; returns True if they are (or were already) in effect.

    Call before seeding megatron (model_parallel_cuda_manual_seed) and before building a model. Does nothing and
    returns False when CUDA is available.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if not isinstance(mp_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):  # also after a forced reset
        mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    if _APPLIED:
        return True
    _ORIGINALS.update(current_device=torch.cuda.current_device, synchronize=torch.cuda.synchronize,
                      get_default_causal_mask=transformer_utils.get_default_causal_mask)
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_synchronize
    transformer_utils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    _APPLIED = True
    return True


def shims_applied() -> bool:
    """Whether apply_cpu_shims() has patched this process."""
    return _APPLIED
