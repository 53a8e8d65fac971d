"""The exceptions deltakv raises for bad input.

Every error a caller can provoke with bytes derives from :class:`DeltaKVError`
(itself a :class:`ValueError`), so ``except DeltaKVError`` is enough to turn any
malformed, truncated or hostile file into a one-line message. Messages name
what was expected, what was found and, where there is one, the byte offset.
"""

from __future__ import annotations


class DeltaKVError(ValueError):
    """Base class of every error deltakv raises for bad input or misuse."""

    def __init__(self, message: str, *, offset: int | None = None, path: str | None = None):
        self.offset = offset
        self.path = path
        where = []
        if path is not None:
            where.append(str(path))
        if offset is not None:
            where.append(f"offset {offset}")
        self.bare_message = message
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class TruncatedError(DeltaKVError):
    """The input ends before a structure it announces."""


class BadMagicError(DeltaKVError):
    """The input does not start with the magic number of the expected format."""


class UnsupportedVersionError(DeltaKVError):
    """The format version is one this reader does not implement."""


class CorruptError(DeltaKVError):
    """A structural rule of the format is broken (sizes, counts, offsets, types)."""


class LimitExceededError(CorruptError):
    """A count or size exceeds what the input could possibly hold (hostile sizes)."""


class ChecksumError(CorruptError):
    """Stored bytes do not match their checksum."""


class AmbiguousLayoutError(DeltaKVError):
    """The bytes fit more than one llama.cpp state layout; the model file would decide."""


class CodecError(DeltaKVError):
    """A codec cannot encode the given values (shape, type, non-finite values)."""


class SessionMismatchError(DeltaKVError):
    """A saved session does not fit the context it is loaded into or extended from."""
