"""Pausing Python's cyclic garbage collector around bulk work that allocates many objects
which nearly all survive (a lifecycle-ingest transaction, loading the stored state, a bulk
read of the key log). The collections such work triggers scan ever more objects and free
nothing (measured: a quarter to a third of those paths); reference counting still frees
everything meanwhile, and a reference cycle made in between waits for the next collection."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused(collect_after: bool = False) -> Iterator[None]:
    """Collector off for the block, back to its previous setting afterwards. `collect_after`
    makes the block pay for the full collection it deferred, instead of whatever allocates
    next (for a bulk read, not for work on a serving path)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        if collect_after:
            gc.collect(2)
