"""How a config field declares itself beyond its type: the error its section's own check raises (FieldError, to
which the loader adds the key path and the file) and its place in a cell's id (field metadata, read by
kislurm.plan.grid when it hashes a cell)."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Literal


class FieldError(ValueError):
    """Raised inside __post_init__ checks; the loader prefixes the key path."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check(ok: bool, key: str, message: str) -> None:
    """A section's range check: FieldError naming `key` unless `ok`."""
    if not ok:
        raise FieldError(key, message)


IdRule = Literal["always", "never", "unless_default"]
CELL_ID = "cell_id"
"""The metadata key of a field's place in the cell id; a field without it enters the id always."""
NOT_IN_ID: Any = MappingProxyType({CELL_ID: "never"})
"""Field metadata: the field changes how or where a cell runs, never what it computes, so it is not in the id."""
IN_ID_UNLESS_DEFAULT: Any = MappingProxyType({CELL_ID: "unless_default"})
"""Field metadata: the field enters the id only at a non-default value. For fields added after ids were first
published: every cell that does not use them keeps the id it had before they existed."""


def id_rule(f: dataclasses.Field) -> IdRule:
    """Where field `f` stands in the cell id: always (the default), never, or unless_default."""
    return f.metadata.get(CELL_ID, "always")


def field_default(f: dataclasses.Field) -> Any:
    """The value a field takes when the config does not set it."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
