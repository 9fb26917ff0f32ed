"""Typed, versioned JSON values stored in etcd.

Every value carries `schema_version` so ops tooling and older readers can tell what they hold. Decoding
never raises anything but `MalformedRecord`, which watchers count and skip (a bad value is never a crash).
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

R = TypeVar("R", bound="VersionedRecord")


class MalformedRecord(ValueError):
    """A value that is not valid JSON for its record type, or carries an unsupported schema version."""


class VersionedRecord(BaseModel):
    """Base of every value stored in etcd: JSON with a schema version; unknown fields are kept (forward compat)."""

    model_config = ConfigDict(extra="allow", frozen=False)

    # Highest schema version this code understands; readers accept any version <= this one.
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: int = 1

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()

    @classmethod
    def decode(cls: type[R], raw: bytes | str) -> R:
        try:
            record = cls.model_validate_json(raw)
        except (ValidationError, ValueError) as exc:
            raise MalformedRecord(f"{cls.__name__}: {_first_line(exc)}") from None
        if record.schema_version > cls.SCHEMA_VERSION or record.schema_version < 1:
            raise MalformedRecord(
                f"{cls.__name__}: schema_version {record.schema_version} not supported (<= {cls.SCHEMA_VERSION})"
            )
        return record


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(text[:3]) if text else type(exc).__name__
