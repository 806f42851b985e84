"""How many threads torch may use while a model learns from small batches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block (or, as a decorator, the function) with torch on one intra-op thread.

    Gradient steps of a few hundred rows, and PPO's one-observation forward passes, are too small for
    intra-op threads to pay, and on 2 cores shared with other work their spin-waits compete with it: 2
    threads made a risk fit 9x slower than 1, and `make run`'s PPO phase took ~15 min instead of ~3 beside
    one busy process (py-spy: a 64-unit Tanh as costly as the Linear before it). One thread also makes the
    fits' numbers independent of the machine's core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
