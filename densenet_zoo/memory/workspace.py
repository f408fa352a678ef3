"""Scratch memory of the fused block: one buffer per thread and dtype on the CPU, reused step after step.

A fused block needs a few (pixels x channels) temporaries whose sizes change from block to block
and from forward to backward. Fresh host allocations of that kind churn the C heap: glibc keeps
the freed blocks (fragmented, in its heaps) or, above its mmap threshold, maps and zero-fills them
again at every step. Carving them from one buffer that lives on does neither, whatever allocator the
process runs. On other devices the caching allocator already reuses memory: there every call
allocates.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_local = threading.local()


def _buffers() -> Dict[Tuple[str, torch.dtype], Tensor]:
    if not hasattr(_local, "buffers"):
        _local.buffers, _local.busy = {}, set()
    return _local.buffers


@contextlib.contextmanager
def scratch(like: Tensor, sizes: Sequence[int], dtype: Optional[torch.dtype] = None,
            slot: str = "block") -> Iterator[List[Tensor]]:
    """Flat tensors of ``sizes`` elements (``dtype``, default ``like``'s; ``like``'s device), valid inside the ``with``.

    ``slot`` names a kind of scratch memory with its own buffer (``"block"``: a block's matrices;
    ``"chunks"``: the chunked kernels' row chunks, used while a block's are in use). On the CPU the
    tensors are slices of the calling thread's buffer for that slot and dtype, which grows
    to the largest request and is kept (:func:`release_workspaces` frees it); a nested request for
    the same slot and dtype, or one on another device, gets fresh memory.
    """
    dtype = dtype or like.dtype
    buffers, total, key = _buffers(), sum(sizes), (slot, dtype)
    if like.device.type != "cpu" or key in _local.busy:
        yield [like.new_empty(n, dtype=dtype) for n in sizes]
        return
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < total:
        buffers.pop(key, None)
        del buffer  # freed before the larger one is allocated
        buffer = buffers[key] = like.new_empty(total, dtype=dtype)
    _local.busy.add(key)
    try:
        yield list(buffer[:total].split(list(sizes)))
    finally:
        _local.busy.discard(key)


def release_workspaces() -> int:
    """Free the calling thread's fused-block scratch buffers; returns the bytes released.

    The buffers are as large as a training step's widest fused block needs (for DenseNet-121 at
    batch 16, 224x224, float32: about 110 MB) and are kept for the next step; call this when the
    process goes on to other work.

    >>> release_workspaces() >= 0
    True
    """
    buffers = _buffers()
    released = sum(b.numel() * b.element_size() for b in buffers.values())
    buffers.clear()
    return released


def workspace_bytes() -> int:
    """Bytes the calling thread's fused-block scratch buffers hold now."""
    return sum(b.numel() * b.element_size() for b in _buffers().values())
