"""Overlap computing the next tensor with writing the current one: :func:`prefetched`.

A streamed edit reads a tensor, computes on it and writes the result, one tensor at a time. File writes, CRC-32
and SHA-256 (``os.write``, ``crc32``, ``hashlib``), numpy ufuncs and torch kernels all release the GIL, so a
second thread that prepares tensor ``i + 1`` while the caller writes tensor ``i`` runs on another core. Measured
on the 2.2 GB checkpoint of ``benchmarks/bench_checkpoints.py``: see ``docs/benchmarks.md``.

Example:

    >>> from hfhooks.io.pipeline import prefetched
    >>> list(prefetched(x * x for x in range(5)))
    [0, 1, 4, 9, 16]
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetched"]

T = TypeVar("T")

_END = object()  # the producer's last message: (_END, None) when done, (_END, exc) when it raised


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """Iterate ``items`` on a background thread, at most ``depth`` items ahead of the caller.

    Items come in order; an exception raised by ``items`` is re-raised here, at the item that raised it. When
    the caller stops early (``break``, an exception, ``close()``), the thread finishes the item it is computing,
    stops, and is joined before this generator returns, so nothing runs on behind the caller's back.

    Torch's grad and inference modes are thread-local: the producer runs with the caller's (at the first item).
    """
    if depth < 1:
        raise ValueError(f"depth={depth!r}: prefetch at least one item ahead (depth >= 1).")
    import torch  # only for the grad and inference modes: hfhooks.io keeps torch out of module import time

    # A slot is taken before an item is computed and given back when the caller takes one: the caller holds item
    # k while items k+1 .. k+depth may be ready or computing, never more (each is a tensor's Δ in memory). A
    # bounded queue alone would let the producer compute one more item and hold it while it waits to put it.
    slots = threading.Semaphore(depth)
    box: queue.Queue = queue.Queue()  # never full: the slots bound it
    stop = threading.Event()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def slot() -> bool:
        while not stop.is_set():  # the caller may have stopped: never wait forever for a slot
            if slots.acquire(timeout=0.05):
                return True
        return False

    source = iter(items)

    def produce() -> None:
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                while slot():
                    try:
                        item = next(source)
                    except StopIteration:
                        break
                    box.put((item, None))
        except BaseException as exc:
            box.put((_END, exc))
            return
        finally:
            if stop.is_set() and hasattr(source, "close"):
                source.close()  # the caller stopped early: run the source's cleanup on the thread that ran it
        box.put((_END, None))

    worker = threading.Thread(target=produce, name="hfhooks-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = box.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            slots.release()  # the item before this one is done with: the producer may compute one more
            yield item
    finally:
        stop.set()  # a producer waiting for a slot sees it within 50 ms; one computing finishes its item first
        worker.join()
