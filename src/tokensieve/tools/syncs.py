"""Counting the host syncs of a call: what stalls a GPU queue (counted the same way on the CPU).

``torch.profiler`` counts ``aten::_local_scalar_dense`` (``.item()``, ``int(t)``, a boolean test on a tensor) and
``aten::nonzero`` (boolean indexing, ``nonzero()``), the two operations that wait for the device on a GPU, including
those torch runs internally. ``Tensor.tolist`` and ``Tensor.numpy`` copy to the host without either, so they are
counted by wrapping them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


@contextmanager
def counting():
    """``with counting() as count: ...``; ``count()`` is the number of host syncs inside the block."""
    copies = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name):
        def read(self, *args, **kwargs):
            copies["n"] += 1
            return originals[name](self, *args, **kwargs)

        return read

    result = {}
    try:
        for name in originals:
            setattr(torch.Tensor, name, wrap(name))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield lambda: result["n"]
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    result["n"] = copies["n"] + sum(e.count for e in prof.key_averages() if e.key in SYNC_OPS)
