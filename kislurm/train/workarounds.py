"""Every workaround of a megatron-core limitation, with the megatron-core versions it was checked against.

A workaround patches or wraps megatron internals that a release may change or fix; one that outlives the version it
was written for can silently do the wrong thing. So each one registers here where it is defined (at import) with
what it works around and the newest megatron-core it was checked against, and importing it under a newer
megatron-core fails at once with one line naming the workaround and the fix. To upgrade megatron-core: re-check each
named workaround against the new release (tests/test_model.py checks every CPU shim is in effect and still needed;
tests/test_train.py, test_resume.py and test_gpu.py cover the optimizer and checkpoint ones), then raise its
`tested_upto`. `KISLURM_ALLOW_UNTESTED_MEGATRON=1` lets an untested release import (with a warning), for the
person doing exactly that check.

Third-party internals (underscore names of megatron-core, torch or submitit) are reached from here and cpu_shims.py only,
each behind a public function, so the rest of kislurm names no private attribute of another module.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from kislurm.errors import UntestedMegatronError  # noqa: F401 (re-exported)

ALLOW_ENV = "KISLURM_ALLOW_UNTESTED_MEGATRON"


@dataclass(frozen=True)
class Workaround:
    name: str
    """Short id, e.g. 'cpu-rng-tracker'."""
    where: str
    """The code that works around it, as module.attribute (kislurm.train.cpu_shims.CpuRNGStatesTracker)."""
    works_around: str
    """The megatron-core behaviour it works around (one sentence)."""
    tested_upto: str
    """The newest megatron-core version it was checked against."""


REGISTRY: dict[str, Workaround] = {}
"""Every workaround imported in this process, by name."""


def _version_key(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string such as 0.16.1, 0.17.0rc0 or 0.16.2.dev0+abc; None if unreadable."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def installed_megatron() -> str:
    from megatron.core import package_info

    return str(package_info.__version__)


def check(workaround: Workaround, installed: str, allow: bool | None = None) -> None:
    """Raise UntestedMegatronError when `installed` is newer than workaround.tested_upto (or unreadable), unless
    allowed (`allow`, default: the KISLURM_ALLOW_UNTESTED_MEGATRON environment variable), then warn."""
    have, upto = _version_key(installed), _version_key(workaround.tested_upto)
    if have is not None and upto is not None and have <= upto:
        return
    message = (f"kislurm's workaround '{workaround.name}' ({workaround.where}: {workaround.works_around}) was "
               f"checked against megatron-core <= {workaround.tested_upto}, but {installed} is installed; fix: "
               f"install megatron-core<={workaround.tested_upto}, or re-check the workaround against {installed} and "
               f"raise its tested_upto (kislurm/train/workarounds.py says how); {ALLOW_ENV}=1 imports it untested")
    if allow is None:
        allow = os.environ.get(ALLOW_ENV, "") not in ("", "0")
    if allow:
        warnings.warn(message, stacklevel=3)
        return
    raise UntestedMegatronError(message)


def require_megatron(name: str, where: str, works_around: str, tested_upto: str,
                     installed: str | None = None) -> Workaround:
    """Register a workaround and check it against the installed megatron-core (call it at import, beside the code)."""
    workaround = Workaround(name, where, works_around, tested_upto)
    REGISTRY[name] = workaround
    check(workaround, installed if installed is not None else installed_megatron())
    return workaround


def use_in_process_results_queue() -> None:
    """Keep synchronous checkpoint saves inside this process.

    megatron's writer hands its results back through a queue that, by default, lives in a `spawn`-context Manager
    process: starting it re-imports the caller's __main__ (scripts then need a __main__ guard), costs seconds, and
    the Manager outlives a training process killed with SIGKILL. A synchronous save puts into and reads from the
    queue in the calling process, so a plain in-process queue is enough. (An asynchronous save needs megatron's
    own cross-process queue: it is not patched then, and a process that ran an async save keeps it.)
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def foreach_norms(tensors: list) -> list:
    """Each tensor's L2 norm in one fused pass (torch's foreach kernel, which has no public name)."""
    import torch

    return list(torch._foreach_norm(tensors))


def foreach_scale_(tensors: list, scale: float) -> None:
    """Multiply every tensor by `scale` in place, in one fused pass (torch's foreach kernel, no public name)."""
    import torch

    torch._foreach_mul_(tensors, scale)


def render_sbatch(command: str, folder: Any, map_count: Optional[int] = None, **params: Any) -> str:
    """The sbatch script submitit would send for these options (`kislurm submit --dry-run`), rendered by submitit
    itself. submitit has no public renderer (its executor renders only while submitting, and refuses to be built
    where srun is missing), so this is kislurm's one use of its private `_make_sbatch_string`; a submitit release
    that changes it fails tests/test_submit.py's saved reference script."""
    from submitit.slurm import slurm

    return slurm._make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)
