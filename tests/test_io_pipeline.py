"""The second thread of streamed edits: ``prefetched`` (diff: the next tensor is diffed while this one is
written) and ``ShardWriter.write_blocks`` with ``lookahead=1`` (apply: a block is written while the next is
computed). Order, errors and early stops must behave exactly as without the thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hfhooks.io import safetensors as st
from hfhooks.io.pipeline import prefetched
from hfhooks.io.safetensors import ShardWriter, TensorBlocks, TensorInfo, read_safetensors_header


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("hfhooks-prefetch", "hfhooks-write"))]


def test_prefetched_keeps_order_and_every_item():
    assert list(prefetched(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(prefetched([])) == []


def test_prefetched_runs_ahead_on_another_thread():
    seen = []

    def source():
        for i in range(3):
            seen.append(threading.current_thread().name)
            yield i

    assert list(prefetched(source())) == [0, 1, 2]
    assert set(seen) == {"hfhooks-prefetch"}


def test_prefetched_reraises_the_sources_error_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise KeyError("tensor 3 is missing")

    got = []
    with pytest.raises(KeyError, match="tensor 3 is missing"):
        for x in prefetched(source()):
            got.append(x)
    assert got == [1, 2]
    assert not _workers()


def test_prefetched_stops_and_joins_when_the_caller_stops_early():
    produced, closed = [], threading.Event()

    def source():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = prefetched(source(), depth=2)
    assert next(it) == 0
    it.close()  # what a `break` or an exception in the caller's loop does
    assert closed.wait(5), "the source's cleanup did not run"
    assert not _workers(), "the producer thread outlived the generator"
    assert len(produced) <= 5  # it stopped: at most depth items queued, one computing, one handed over


def test_prefetched_stops_when_the_caller_raises():
    def slow():
        for i in range(100):
            time.sleep(0.001)
            yield i

    with pytest.raises(RuntimeError, match="writer failed"):
        for x in prefetched(slow()):
            if x == 3:
                raise RuntimeError("writer failed")
    assert not _workers()


@pytest.mark.parametrize("enabled", [True, False])
def test_prefetched_runs_the_source_with_the_callers_grad_mode(enabled):
    w = torch.ones(3, requires_grad=True)
    with torch.set_grad_enabled(enabled):
        (out,) = list(prefetched(w * k for k in [2]))  # w * k runs on the producer thread
    assert out.requires_grad is enabled


def test_prefetched_refuses_a_depth_below_one():
    with pytest.raises(ValueError, match="depth=0"):
        list(prefetched([1], depth=0))


# -- ShardWriter.write_blocks with a writer thread ------------------------------------------------------------
def _blocks(values: torch.Tensor, size: int, lookahead: int):
    """``values`` in blocks of ``size`` through as many reused buffers as the lookahead allows, the way
    ``_plus_blocks`` hands them out (a buffer is rewritten once ``lookahead + 1`` more blocks were pulled)."""
    buffers = [torch.empty(size, dtype=values.dtype) for _ in range(lookahead + 1)]
    for k, i in enumerate(range(0, values.numel(), size)):
        block = buffers[k % len(buffers)][: min(size, values.numel() - i)]
        block.copy_(values[i : i + size])
        yield block


def _write(path, values: torch.Tensor, blocks: TensorBlocks) -> None:
    info = TensorInfo("w", path, values.dtype, tuple(values.shape), 0, values.numel() * values.element_size())
    writer = ShardWriter(path, [info], {"format": "pt"})
    try:
        writer.write_blocks("w", blocks)
    finally:
        writer.close(fsync=False)


@pytest.mark.parametrize("n", [0, 1, 7, 64, 65, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_overlapped_writes_write_the_same_bytes(tmp_path, monkeypatch, n, dtype):
    values = torch.randn(n).to(dtype)
    write_all = st.write_all

    def late_write(fd, data):  # a slow disk: a buffer reused too early would be written with the wrong bytes
        time.sleep(0.002)
        write_all(fd, data)

    monkeypatch.setattr(st, "write_all", late_write)
    for lookahead in (0, 1):
        path = tmp_path / f"w{lookahead}.safetensors"
        _write(path, values, TensorBlocks(dtype, (n,), _blocks(values, 8, lookahead), lookahead=lookahead))
    assert (tmp_path / "w0.safetensors").read_bytes() == (tmp_path / "w1.safetensors").read_bytes()
    header, _ = read_safetensors_header(tmp_path / "w1.safetensors")
    assert header["w"].shape == (n,)
    assert not _workers()


def test_an_error_while_computing_a_block_waits_for_the_write_in_flight(tmp_path, monkeypatch):
    writes = []

    def slow_write(fd, data):
        time.sleep(0.05)
        writes.append(bytes(data))

    def failing():
        yield torch.ones(4)
        raise ValueError("Δ failed its CRC-32 check")

    info = TensorInfo("w", tmp_path / "x.safetensors", torch.float32, (8,), 0, 32)
    writer = ShardWriter(tmp_path / "x.safetensors", [info], {"format": "pt"})
    monkeypatch.setattr(st, "write_all", slow_write)  # after the header
    with pytest.raises(ValueError, match="CRC-32"):
        writer.write_blocks("w", TensorBlocks(torch.float32, (8,), failing(), lookahead=1))
    # the write that was in flight finished before the error left write_blocks (the fd closes right after)
    assert writes == [torch.ones(4).numpy().tobytes()]
    assert not _workers()
    writer.close(fsync=False)


def test_a_failed_write_is_raised_and_stops_the_blocks(tmp_path, monkeypatch):
    pulled = []

    def full_disk(fd, data):
        raise OSError(28, "No space left on device")

    def blocks():
        for i in range(100):
            pulled.append(i)
            yield torch.full((4,), float(i))

    info = TensorInfo("w", tmp_path / "x.safetensors", torch.float32, (400,), 0, 1600)
    writer = ShardWriter(tmp_path / "x.safetensors", [info], {"format": "pt"})
    monkeypatch.setattr(st, "write_all", full_disk)  # after the header
    with pytest.raises(OSError, match="No space left"):
        writer.write_blocks("w", TensorBlocks(torch.float32, (400,), blocks(), lookahead=1))
    assert len(pulled) <= 3  # the error surfaced at the next block, not after all 100
    writer.close(fsync=False)


# -- the CRC-32 ---------------------------------------------------------------------------------------------
def test_crc32_is_zlibs_checksum_on_any_bytes_and_seed():
    import os
    import zlib

    for n in (0, 1, 7, 4096, 1 << 20, (1 << 20) + 3):
        data = os.urandom(n)
        assert st.crc32(data) == zlib.crc32(data)
        assert st.crc32(memoryview(data), 0xDEADBEEF) == zlib.crc32(data, 0xDEADBEEF)
        half = n // 2
        assert st.crc32(data[half:], st.crc32(data[:half])) == zlib.crc32(data)  # continues a running CRC


def test_crc32_uses_zlib_ng_where_installed():
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")
    assert st._crc32 is zlib_ng.crc32  # the dependency is what makes diff files' checksums fast
