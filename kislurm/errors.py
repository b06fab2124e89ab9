"""Every error kislurm raises for bad input or a stage that cannot go on, under one base.

Each message is one line naming the problem and the fix; the CLI catches KislurmError and prints it as such (exit 2).
Each type keeps a builtin base as well (ValueError, RuntimeError, ImportError), so `except ValueError` callers still
work. The stage modules re-export their own (kislurm.plan.config.ConfigError is this module's ConfigError).
"""


class KislurmError(Exception):
    """Base of kislurm's own errors: the CLI shows any of them as one line, exit 2."""


class ConfigError(KislurmError, ValueError):
    """A bad experiment config; the message is one line: where, what was expected, and the fix."""


class DataError(KislurmError, ValueError):
    """Bad data input (triplets, templates, tokenizer, dataset prefix, ratio); the message is one line with the fix."""


class TrainError(KislurmError, RuntimeError):
    """A cell that cannot train as configured; the message is one line naming the problem and the fix."""


class UntestedMegatronError(KislurmError, ImportError):
    """The installed megatron-core is newer than a workaround was checked against (one line: which, and the fix)."""


class EvalError(KislurmError, ValueError):
    """A probe set that cannot be scored by this model (message: one line, the problem and the fix)."""


class StoreError(KislurmError):
    """A store file is unusable or would be misused; the message is one line: '<path>: <problem>; fix: ...'."""


class DigestError(KislurmError, ValueError):
    """The user block holds a digest that does not match its file (truncated, edited, or damaged)."""


class SubmitError(KislurmError, RuntimeError):
    """A run that cannot be submitted; the message is one line with the fix."""


class AggregateError(KislurmError, RuntimeError):
    """Nothing could be aggregated (e.g. no run folder); one line with the fix."""


class MeasurementError(KislurmError, ValueError):
    """A bad measurements table; the message is one line: file, line/column, problem, fix."""


class ValidationError(KislurmError, ValueError):
    """A validation request that cannot be planned; one line with the fix."""


class PilotError(KislurmError, RuntimeError):
    """The pilot refuses the grid; one line with the numbers and the fix."""


class CellsFailed(SubmitError):
    """Cells that ran here (local or debug executor) and failed; `failures` holds one line per cell (its failed
    ranks), the message the count and the fix. The CLI prints each failure, then the message (exit 1)."""

    def __init__(self, message: str, failures: list[str]):
        super().__init__(message)
        self.failures = failures
