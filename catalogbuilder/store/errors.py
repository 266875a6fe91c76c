"""What can go wrong with a spectrum store, as exceptions (their messages are printed to users as they are)."""
from __future__ import annotations


class StoreError(Exception):
    """The store cannot be opened or written (missing, not a spectrum store, unwritable, conflicting commits)."""


class StoreLayoutError(StoreError):
    """The store was written in another layout version; the message says how to upgrade it."""


class StoreWriteError(StoreError):
    """The store could not be written (e.g. a full disk); nothing was committed, the store is as it was."""


class StoreConflictError(StoreError):
    """Another ingest committed first and this one could not be redone within its attempts; nothing was committed."""

