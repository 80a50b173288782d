"""Failures of the engine under a store, named for what the caller can do about them."""
from __future__ import annotations


class StoreFullError(RuntimeError):
    """The store reached its size cap (or the disk / the server's memory is full); what was committed
    before stays intact."""


class BackendUnavailableError(ConnectionError):
    """The shared backend cannot be reached (down, restarting, wrong URL)."""


class StoreClosedError(RuntimeError):
    """The store was closed (its RagBlend's `close()`); open a new RagBlend on the folder to use it again."""
