"""How many bytes of the tensors autograd saved for a backward some graph still holds, and the process's RSS.

Every tensor autograd saves for a backward goes through ``torch.autograd.graph.saved_tensors_hooks``.
The pack hook wraps it in a small box and keeps only a weak reference to the box, so a box lives exactly
as long as some graph node holds it: once a backward has used a node's saved tensors, or the graph is
dropped, its boxes die. These are the bytes that fill a GPU when graphs stay alive. Notebook 02 counts
them by walking the live boxes; here a callback on each box's weak reference keeps the total, so asking
costs nothing however many boxes are alive (a training run holds hundreds of thousands).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor

__all__ = ["SavedTensors", "rss_bytes"]


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedTensors:
    """While active (``with saved:``, as often as needed), counts the saved tensors still held.

    A storage saved by several nodes, or under several views, counts once, at its full size: that is
    the memory it keeps. ``nbytes()`` is the total now, ``count()`` the number of saved tensors.
    """

    def __init__(self) -> None:
        self._storages: dict[tuple, list[int]] = {}  # (device, data_ptr) -> [live boxes, bytes]
        self._refs: set[weakref.ref] = set()
        self._nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda box: box.tensor)

    def _pack(self, tensor: Tensor) -> _Box:
        # Detached: a box holding the tensor itself would hold its grad_fn, the very node that saves the box,
        # a cycle through C++ that Python's gc cannot see, and the graph of a forward without a backward
        # would never be freed (torch's saved_tensors_hooks warns of it). Notebook 02's boxes do this.
        box = _Box(tensor.detach())
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        entry = self._storages.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self._nbytes += entry[1]
        entry[0] += 1
        self._refs.add(weakref.ref(box, lambda ref: self._release(ref, key)))
        return box

    def _release(self, ref: weakref.ref, key: tuple) -> None:
        self._refs.discard(ref)
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:  # its last box died: the storage may be freed and its address reused
            self._nbytes -= entry[1]
            del self._storages[key]

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def nbytes(self) -> int:
        return self._nbytes

    def count(self) -> int:
        return len(self._refs)


def rss_bytes() -> int:
    """Resident set size of this process (Linux's /proc/self/statm), what the operating system sees."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
