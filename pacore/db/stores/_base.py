"""What every store shares: the database, the current time, and integrity-error mapping."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy.exc import IntegrityError

from pacore.db.engine import Database
from pacore.errors import ConflictError, NotFoundError, PACoreError, ValidationError

__all__ = ["MAX_TAGS", "StoreBase", "chunked", "clean_tags", "integrity_error", "utcnow"]

T = TypeVar("T")

MAX_TAGS = 32
MAX_TAG_LEN = 64


def utcnow() -> datetime:
    return datetime.now(UTC)


class StoreBase:
    def __init__(self, db: Database) -> None:
        self.db = db


def integrity_error(exc: IntegrityError, conflict: str) -> PACoreError:
    """A unique violation as a 409 with ``conflict``; a missing owner row as a 404."""
    text = str(exc.orig).lower()
    if "foreign key" in text:
        return NotFoundError("user not found")
    return ConflictError(conflict)


def clean_tags(tags: Iterable[str] | None) -> list[str]:
    """Tags stripped, de-duplicated in order, and checked for count and length."""
    out: list[str] = []
    for tag in tags or []:
        if not isinstance(tag, str):
            raise ValidationError("tags must be strings", param="tags")
        tag = tag.strip()
        if not tag or len(tag) > MAX_TAG_LEN:
            raise ValidationError(f"a tag must be 1 to {MAX_TAG_LEN} characters", param="tags")
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise ValidationError(f"at most {MAX_TAGS} tags", param="tags")
    return out


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
