"""The serving processes' garbage-collector settings (serving/platform.py, ``settle_heap``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from decision_platform.serving.platform import WORKER_GC_THRESHOLD, settle_heap


@pytest.fixture
def settled() -> Iterator[list[int]]:
    """The stream worker's settle_heap() applied, the generations collected from then on; restored after."""
    threshold = gc.get_threshold()
    collected: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collected.append(info["generation"])

    try:
        settle_heap(WORKER_GC_THRESHOLD)
        gc.callbacks.append(note)
        yield collected
    finally:
        gc.callbacks.remove(note)
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_a_batch_of_live_objects_does_not_set_the_collector_off(settled: list[int]) -> None:
    assert gc.get_freeze_count() > 0  # what start-up loaded is out of every collection's way
    batch = [{"event": i, "reasons": [i]} for i in range(4000)]  # a worker batch's containers, alive at once
    assert len(batch) == 4000 and settled == []  # at the default threshold (700): several collections


def test_cyclic_garbage_is_still_collected(settled: list[int]) -> None:
    class Node:
        pass

    node = Node()
    node.itself = node  # type: ignore[attr-defined]
    gone = weakref.ref(node)
    del node
    alive = [[] for _ in range(WORKER_GC_THRESHOLD + 100)]
    assert len(alive) > WORKER_GC_THRESHOLD
    assert gone() is None and settled  # collected by the young generation's collection, not at exit
