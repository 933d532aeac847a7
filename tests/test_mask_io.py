"""``ParamMask`` file I/O (bit-packed safetensors), set algebra, and rejection of every bad or mutated file."""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hfhooks import ArtifactError, MaskFileError, ParamMask
from hfhooks.core.params import UnknownParameterError
from hfhooks.io.artifacts import artifact_digest, write_artifact

# --------------------------------------------------------------------------------------------------------------
# Masks used throughout: every granularity, odd sizes (padding bits), 0-d and empty tensors.


def _bits(shape, p=0.5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def element_mask() -> ParamMask:
    return ParamMask(
        {
            "model.embed.weight": _bits((13, 7), 0.3, 1),
            "model.layers.0.bias": _bits((5,), 0.6, 2),
            "scalar": torch.tensor(True),
            "empty": torch.zeros(0, 3, dtype=torch.bool),
            "all_ones": torch.ones(9, dtype=torch.bool),
            "all_zeros": torch.zeros(2, 2, 2, dtype=torch.bool),
        },
        metadata={"note": "hand-made", "nested": {"a": [1, 2.5, None, True]}},
    )


SHAPES = {"up.weight": (12, 5), "up.bias": (12,), "down.weight": (5, 12), "conv.weight": (6, 3, 2, 2)}


def slice_mask() -> ParamMask:
    return ParamMask.from_slices(
        {
            "up.weight": (0, torch.tensor([0, 3, 11])),
            "up.bias": (0, torch.tensor([0, 3, 11])),
            "down.weight": (1, torch.tensor([0, 3, 11])),
            "conv.weight": (1, torch.tensor([2])),
        },
        SHAPES,
    )


def scored_mask() -> ParamMask:
    from hfhooks.masks.saliency import Scores

    g = torch.Generator().manual_seed(3)
    scores = Scores(
        {"a.weight": torch.randn(33, 17, generator=g), "b.weight": torch.randn(100, generator=g)},
        metadata={"score": "grad_abs_sum", "batches": 3, "examples": 24},
    )
    return ParamMask.from_scores(scores, ratio=0.37)


def mixed_mask() -> ParamMask:
    return slice_mask() | ParamMask({"up.weight": _bits((12, 5), 0.2, 5)}) | element_mask()


MASKS = {"element": element_mask, "slices": slice_mask, "scored": scored_mask, "mixed": mixed_mask}


def assert_same(a: ParamMask, b: ParamMask) -> None:
    assert a == b
    assert a.names() == b.names()
    for n in a:
        assert a.granularity(n) == b.granularity(n)
        assert a.shape(n) == b.shape(n)
        assert a[n].shape == b[n].shape
        assert torch.equal(a.vector(n), b.vector(n))
    assert a.densities() == b.densities()
    assert a.counts() == b.counts()


def header_size(path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


# --------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("kind", list(MASKS))
def test_round_trip_is_bit_exact(kind, tmp_path):
    mask = MASKS[kind]()
    path = mask.save(tmp_path / "m.safetensors")
    assert path == tmp_path / "m.safetensors"
    loaded = ParamMask.load(path)
    assert_same(mask, loaded)
    assert loaded.metadata["semantics"] == "1=trainable"
    assert loaded.metadata["kind"] == "mask"
    for key, value in mask.metadata.items():
        assert loaded.metadata[key] == value
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file behind"


def test_round_trip_preserves_score_and_selection(tmp_path):
    mask = scored_mask()
    assert mask.metadata["score"] == "grad_abs_sum"
    loaded = ParamMask.load(mask.save(tmp_path / "m.safetensors", run="r1"))
    assert loaded.metadata["score"] == "grad_abs_sum"
    assert loaded.metadata["batches"] == 3 and loaded.metadata["examples"] == 24
    assert loaded.metadata["selection"] == mask.metadata["selection"]
    assert loaded.metadata["selection"]["ratio"] == 0.37
    assert loaded.metadata["run"] == "r1"
    assert sum(k for k, _ in loaded.counts().values()) == round(0.37 * (33 * 17 + 100))


def test_granularities_survive(tmp_path):
    loaded = ParamMask.load(slice_mask().save(tmp_path / "m.safetensors"))
    assert loaded.granularity("up.weight") == "row"
    assert loaded.granularity("down.weight") == "column"
    assert loaded.granularity("up.bias") == "element"
    assert loaded.granularity("conv.weight") == "column"
    assert loaded.vector("up.weight").tolist() == [i in (0, 3, 11) for i in range(12)]
    assert loaded["down.weight"][:, 3].all() and not loaded["down.weight"][:, 4].any()
    assert loaded.counts()["up.weight"] == (15, 60)
    assert loaded.density("conv.weight") == pytest.approx(1 / 3)


def test_loaded_mask_can_be_saved_again(tmp_path):
    first = scored_mask()
    loaded = ParamMask.load(first.save(tmp_path / "a.safetensors"))
    again = ParamMask.load(loaded.save(tmp_path / "b.safetensors"))
    assert_same(first, again)
    assert again.metadata["selection"] == first.metadata["selection"]
    with safe_open(str(tmp_path / "b.safetensors"), "np") as f:  # a fresh stamp, not the old one re-encoded
        meta = f.metadata()
    assert meta["hfhooks.kind"] == "mask" and meta["hfhooks.format_version"] == "1"
    assert "hfhooks.digest" in meta and "hfhooks.kind" not in json.loads(meta["hfhooks.tensors"])


def test_save_with_model_fingerprint(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    mask = ParamMask.full(model, True)
    loaded = ParamMask.load(mask.save(tmp_path / "m.safetensors", model=model))
    assert loaded.metadata["model"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert loaded.metadata["model"]["num_tensors"] == 4
    assert loaded.validate(model).keys() == set(mask.names())


def test_reserved_metadata_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        element_mask().save(tmp_path / "m.safetensors", kind="diff")


def test_empty_mask_round_trip(tmp_path):
    loaded = ParamMask.load(ParamMask().save(tmp_path / "m.safetensors"))
    assert len(loaded) == 0 and loaded == ParamMask()


def test_readable_without_hfhooks(tmp_path):
    """The recipe in the masks.py docstring: plain safe_open + numpy.unpackbits."""
    mask = mixed_mask()
    path = mask.save(tmp_path / "m.safetensors")
    with safe_open(str(path), "np") as f:
        info = json.loads(f.metadata()["hfhooks.tensors"])
        assert set(info) == set(f.keys()) == set(mask.names())
        for name, meta in info.items():
            packed = f.get_tensor(name)
            assert packed.dtype == np.uint8 and packed.ndim == 1
            assert packed.size == (meta["length"] + 7) // 8
            bits = np.unpackbits(packed, count=meta["length"]).astype(bool)
            assert meta["granularity"] == mask.granularity(name)
            assert tuple(meta["shape"]) == mask.shape(name)
            assert meta["ones"] == int(bits.sum())
            if meta["granularity"] == "element":
                np.testing.assert_array_equal(bits.reshape(meta["shape"]), mask[name].numpy())
            else:
                np.testing.assert_array_equal(bits, mask.vector(name).numpy())
        assert json.loads(f.metadata()["hfhooks.semantics"]) == "1=trainable"


@pytest.mark.parametrize(
    "masks",
    [
        {f"layer{i}.weight": _bits((64 + 8 * i, 48), 0.5, i) for i in range(12)},
        {"big": _bits((1000, 999), 0.1, 7), "odd": _bits((3, 333), 0.9, 8)},
    ],
    ids=["many", "big"],
)
def test_file_size_is_one_bit_per_element(masks, tmp_path):
    mask = ParamMask(masks)
    path = mask.save(tmp_path / "m.safetensors")
    total_bits = sum(t.numel() for t in masks.values())
    size = os.path.getsize(path)
    assert size <= 1.02 * total_bits / 8 + header_size(path), (size, total_bits / 8, header_size(path))


def test_file_size_row_masks_store_one_bit_per_row(tmp_path):
    mask = ParamMask.from_slices({"w": (0, torch.arange(0, 4096, 3))}, {"w": (4096, 1024)})
    path = mask.save(tmp_path / "m.safetensors")
    assert os.path.getsize(path) - header_size(path) == 4096 // 8


# --------------------------------------------------------------------------------------------------------------
# Set algebra


def test_and_or_same_granularity():
    a = ParamMask({"x": torch.tensor([1, 1, 0, 0], dtype=torch.bool)})
    b = ParamMask({"x": torch.tensor([1, 0, 1, 0], dtype=torch.bool)})
    assert (a & b)["x"].tolist() == [True, False, False, False]
    assert (a | b)["x"].tolist() == [True, True, True, False]
    assert (~a)["x"].tolist() == [False, False, True, True]
    assert ~~a == a


def test_absent_names_are_zero():
    a = ParamMask({"x": torch.ones(3, dtype=torch.bool), "only_a": torch.ones(2, dtype=torch.bool)})
    b = ParamMask({"x": torch.ones(3, dtype=torch.bool), "only_b": torch.ones(4, dtype=torch.bool)})
    both = a & b
    assert both.names() == ["x", "only_a", "only_b"]
    assert both["x"].all() and not both["only_a"].any() and not both["only_b"].any()
    either = a | b
    assert either["only_a"].all() and either["only_b"].all()
    assert (~a).names() == a.names()  # ~ inverts within the mask's own names
    assert not (~a)["only_a"].any()


def test_row_and_column_algebra_and_mixed_granularity():
    rows = ParamMask.from_slices({"w": (0, [0, 2])}, {"w": (4, 3)})
    rows2 = ParamMask.from_slices({"w": (0, [2, 3])}, {"w": (4, 3)})
    cols = ParamMask.from_slices({"w": (1, [1])}, {"w": (4, 3)})
    same = rows & rows2
    assert same.granularity("w") == "row" and same.vector("w").tolist() == [False, False, True, False]
    assert (rows | rows2).granularity("w") == "row"
    inv = ~cols
    assert inv.granularity("w") == "column" and inv.vector("w").tolist() == [True, False, True]
    mixed = rows & cols
    assert mixed.granularity("w") == "element"
    expected = rows["w"] & cols["w"]
    assert torch.equal(mixed["w"], expected) and int(expected.sum()) == 2
    union = rows | cols
    assert union.granularity("w") == "element"
    assert union.counts()["w"] == (6 + 4 - 2, 12)
    elem = ParamMask({"w": torch.eye(4, 3, dtype=torch.bool)})
    assert torch.equal((elem | rows)["w"], elem["w"] | rows["w"])
    absent_row = rows & ParamMask({"v": torch.ones(2, dtype=torch.bool)})
    assert absent_row.granularity("w") == "row" and not absent_row["w"].any()


def test_shape_conflict_is_an_error():
    a = ParamMask({"x": torch.ones(3, dtype=torch.bool)})
    b = ParamMask({"x": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        a & b
    with pytest.raises(ValueError, match="shape"):
        a | b
    rows = ParamMask.from_slices({"x": (0, [0])}, {"x": (3, 2)})
    with pytest.raises(ValueError, match="shape"):
        rows | ParamMask({"x": torch.ones(2, 3, dtype=torch.bool)})


def test_complete_fills_missing_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    part = ParamMask({"0.weight": torch.eye(3, 4, dtype=torch.bool)})
    for fill in (False, True):
        full = part.complete(model, fill=fill)
        assert set(full.names()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        assert torch.equal(full["0.weight"], part["0.weight"])
        for name in ("0.bias", "2.weight", "2.bias"):
            assert full[name].shape == dict(model.named_parameters())[name].shape
            assert bool(full[name].all()) is fill and bool(full[name].any()) is fill
        full.validate(model)
    rows = ParamMask.from_slices({"0.weight": (0, [1])}, model)
    assert rows.complete(model).granularity("0.weight") == "row"


def test_constructor_and_access_errors():
    with pytest.raises(ValueError, match="boolean"):
        ParamMask({"x": torch.tensor([0.0, 1.0])})
    with pytest.raises(ValueError, match="boolean"):
        ParamMask({"x": torch.tensor([0, 2])})
    assert ParamMask({"x": torch.tensor([0, 1])})["x"].tolist() == [False, True]
    with pytest.raises(UnknownParameterError):
        ParamMask()["nope"]
    with pytest.raises(UnknownParameterError):
        ParamMask.from_slices({"nope": (0, [0])}, {"w": (2, 2)})
    with pytest.raises(ValueError, match="Axis"):
        ParamMask.from_slices({"w": (2, [0])}, {"w": (2, 2)})


# --------------------------------------------------------------------------------------------------------------
# Bad files: always MaskFileError (an ArtifactError, a ValueError) with a message saying what is wrong


def test_error_hierarchy():
    assert issubclass(MaskFileError, ArtifactError) and issubclass(ArtifactError, ValueError)


def _expect(path, *fragments) -> MaskFileError:
    with pytest.raises(MaskFileError) as info:
        ParamMask.load(path)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, msg
    return info.value


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.safetensors", "no such file")
    _expect(tmp_path, "not a regular file")  # a directory


def test_torch_save_pickle(tmp_path):
    path = tmp_path / "mask.pt"
    torch.save({"w": torch.ones(3, 3, dtype=torch.bool)}, path)
    _expect(path, "torch.save()", "not safetensors", "never unpickles")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3, dtype=torch.int64)}, legacy, _use_new_zipfile_serialization=False)
    _expect(legacy, "pickle")


def test_plain_model_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(nn.Linear(3, 2).state_dict(), str(path))
    _expect(path, "not an hfhooks artifact", "weight", "mask")


def test_diff_artifact(tmp_path):
    path = write_artifact(tmp_path / "d.safetensors", {"w": torch.randn(3, 3)}, kind="diff", meta={"a": 1})
    _expect(path, "'diff'", "not a 'mask'")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    _expect(path, "not a readable safetensors file")


def test_random_bytes(tmp_path):
    path = tmp_path / "r.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _expect(path, "not a readable safetensors file")


def test_truncated_and_flipped(tmp_path):
    path = element_mask().save(tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    _expect(path, "truncated or corrupt")
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    path.write_bytes(bytes(flipped))
    _expect(path, "integrity check")


def test_inconsistent_metadata_messages(tmp_path):
    path = tmp_path / "m.safetensors"
    craft(path, set_info("model.embed.weight", "ones", 0))
    _expect(path, "'model.embed.weight'", "ones")
    craft(path, set_info("model.embed.weight", "length", 90))
    _expect(path, "length 90 does not match")
    craft(path, drop_tensor("scalar"))
    _expect(path, "does not list exactly the stored tensors")


# --------------------------------------------------------------------------------------------------------------
# Property-based fuzzing: a mutated file must never load silently, nor raise anything but MaskFileError

FUZZ_MASKS = {
    "element": element_mask(),
    "slices": slice_mask(),
    "mixed": mixed_mask(),
    "scored": ParamMask.from_scores({"w": torch.arange(40.0).reshape(8, 5)}, 0.25),
}
_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="hfhooks-fuzz-"))
atexit.register(shutil.rmtree, _FUZZ_DIR, ignore_errors=True)
FUZZ_BYTES = {k: m.save(_FUZZ_DIR / f"{k}.safetensors").read_bytes() for k, m in FUZZ_MASKS.items()}
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


def check_bytes(data: bytes, original: str) -> None:
    """Load ``data``: a MaskFileError, or — only for unchanged bytes — the original mask. Nothing else."""
    fd, name = tempfile.mkstemp(suffix=".safetensors", dir=_FUZZ_DIR)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            loaded = ParamMask.load(name)
        except MaskFileError:
            assert data != FUZZ_BYTES[original], "an unmodified file was rejected"
            return
        assert data == FUZZ_BYTES[original], "a modified mask file loaded without error"
        assert_same(loaded, FUZZ_MASKS[original])
    finally:
        os.unlink(name)


originals = st.sampled_from(list(FUZZ_BYTES))


@settings(FUZZ, max_examples=300)
@given(original=originals, data=st.data())
def test_fuzz_truncation(original, data):
    raw = FUZZ_BYTES[original]
    cut = data.draw(st.integers(0, len(raw)))
    check_bytes(raw[:cut], original)


@settings(FUZZ, max_examples=800)
@given(original=originals, data=st.data())
def test_fuzz_single_bit_flip(original, data):
    raw = bytearray(FUZZ_BYTES[original])
    offset = data.draw(st.integers(0, len(raw) - 1))
    raw[offset] ^= 1 << data.draw(st.integers(0, 7))
    check_bytes(bytes(raw), original)


@settings(FUZZ, max_examples=400)
@given(original=originals, data=st.data())
def test_fuzz_multiple_bit_flips(original, data):
    raw = bytearray(FUZZ_BYTES[original])
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 7)), min_size=2, max_size=8)
    )
    for offset, bit in flips:
        raw[offset] ^= 1 << bit
    check_bytes(bytes(raw), original)  # flips may cancel: then the bytes are unchanged and must load


@settings(FUZZ, max_examples=400)
@given(original=originals, data=st.data())
def test_fuzz_byte_overwrites(original, data):
    raw = bytearray(FUZZ_BYTES[original])
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(0, len(raw) - 1))
        size = data.draw(st.integers(1, 16))
        chunk = data.draw(
            st.one_of(st.binary(min_size=1, max_size=size), st.sampled_from([b"\x00", b" ", b"{", b"}"]))
        )
        raw[offset : offset + len(chunk)] = chunk
    check_bytes(bytes(raw), original)


@settings(FUZZ, max_examples=300)
@given(original=originals, data=st.data())
def test_fuzz_header_length_field(original, data):
    raw = FUZZ_BYTES[original]
    (n,) = struct.unpack("<Q", raw[:8])
    new = data.draw(
        st.one_of(
            st.integers(n - 16, n + 16).filter(lambda v: v >= 0),
            st.integers(0, 2**64 - 1),
            st.sampled_from([0, 1, 2, len(raw), len(raw) - 8, 100_000_001, 2**63, 2**64 - 1]),
        )
    )
    check_bytes(struct.pack("<Q", new) + raw[8:], original)


@settings(FUZZ, max_examples=300)
@given(
    data=st.binary(max_size=600),
    prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x04", b"\x10\x00\x00\x00"]),
)
def test_fuzz_random_bytes(data, prefix):
    fd, name = tempfile.mkstemp(suffix=".safetensors", dir=_FUZZ_DIR)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(prefix + data)
        with pytest.raises(MaskFileError):
            ParamMask.load(name)
    finally:
        os.unlink(name)


# -- hand-crafted files: valid safetensors, digest recomputed, but inconsistent hfhooks metadata -------------


def _read(original: str = "element") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(_FUZZ_DIR / f"{original}.safetensors"), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


_INFO = object()  # placeholder: "serialize the (possibly mutated) info dict here"


def craft(path, mutate, original: str = "element", redigest: bool = True) -> None:
    """Write ``original`` with ``mutate(metadata, info, tensors)`` applied and (by default) a *valid* digest.

    ``info`` is the decoded ``hfhooks.tensors``; ``mutate`` may also replace or delete that key itself.
    """
    meta, tensors = _read(original)
    info = json.loads(meta["hfhooks.tensors"])
    meta["hfhooks.tensors"] = _INFO
    mutate(meta, info, tensors)
    if meta.get("hfhooks.tensors") is _INFO:
        meta["hfhooks.tensors"] = json.dumps(info)
    if redigest:
        meta["hfhooks.digest"] = artifact_digest(meta, tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def set_info(name, key, value):
    def mutate(meta, info, tensors):
        info[name][key] = value

    return mutate


def del_info(name, key):
    def mutate(meta, info, tensors):
        del info[name][key]

    return mutate


def drop_tensor(name):
    def mutate(meta, info, tensors):
        del tensors[name]

    return mutate


def _first(info) -> str:
    return next(iter(info))


WRONG_VALUES = st.one_of(
    st.integers(-3, 10_000),
    st.sampled_from([True, False, None, 1.0, 0.5, "7", [], {}, [3], 2**70, -1]),
    st.floats(allow_nan=False),
)
SHAPES_BAD = st.one_of(
    st.lists(st.integers(-2, 40), max_size=4),
    st.sampled_from(
        [
            [True, 13, 7],
            [13.0, 7],
            [13, 7.0],
            "13x7",
            None,
            {},
            [[13], 7],
            [2**32, 2**32],
            [2**40, 2**40],
            [2**70],
        ]
    ),
)


def _consistent(shape, gran, length) -> bool:
    """Whether (shape, granularity, length) is a valid combination (then only the meaning changed)."""
    if gran not in ("element", "row", "column") or type(shape) is not list:
        return False
    if not all(type(s) is int and s >= 0 for s in shape):
        return False
    if gran == "element":
        return math.prod(shape) == length
    return len(shape) >= 2 and shape[0 if gran == "row" else 1] == length


@st.composite
def mutations(draw):
    """(description, mutate function, original) — each mutation makes the file inconsistent or foreign."""
    original = draw(st.sampled_from(list(FUZZ_BYTES)))
    info = json.loads(_read(original)[0]["hfhooks.tensors"])
    name = draw(st.sampled_from(list(info)))
    entry = info[name]
    kind = draw(
        st.sampled_from(
            [
                "length",
                "ones",
                "density",
                "shape",
                "granularity",
                "missing_key",
                "entry_not_object",
                "drop_info",
                "extra_info",
                "drop_tensor",
                "extra_tensor",
                "dtype",
                "tensor_shape",
                "tensor_size",
                "padding",
                "tensors_json",
                "tensors_missing",
                "semantics",
                "stamp",
                "bad_json",
            ]
        )
    )
    if kind in ("length", "ones", "density"):
        value = draw(WRONG_VALUES.filter(lambda v, k=kind: not (type(v) is type(entry[k]) and v == entry[k])))
        return kind, set_info(name, kind, value), original
    if kind == "shape":
        value = draw(SHAPES_BAD)
        assume(not _consistent(value, entry["granularity"], entry["length"]))  # e.g. [7, 13] for [13, 7]
        return kind, set_info(name, "shape", value), original
    if kind == "granularity":
        value = draw(st.sampled_from(["element", "row", "column", "Row", "", None, 0]))
        # A relabelling that stays self-consistent (an empty (0, 3) element mask is also a valid row mask
        # with 0 rows) describes the same mask validly: not a corruption, so not generated.
        assume(not _consistent(entry["shape"], value, entry["length"]))
        return kind, set_info(name, "granularity", value), original
    if kind == "missing_key":
        key = draw(st.sampled_from(sorted(entry)))
        return kind, del_info(name, key), original
    if kind == "entry_not_object":
        value = draw(st.sampled_from([None, [], "x", 3, [entry]]))

        def mutate(meta, info, tensors):
            info[name] = value

        return kind, mutate, original
    if kind == "drop_info":

        def mutate(meta, info, tensors):
            del info[name]

        return kind, mutate, original
    if kind == "extra_info":

        def mutate(meta, info, tensors):
            info["ghost"] = dict(entry)

        return kind, mutate, original
    if kind == "drop_tensor":
        return kind, drop_tensor(name), original
    if kind == "extra_tensor":
        with_info = draw(st.booleans())
        value = draw(
            st.sampled_from([torch.zeros(2, dtype=torch.uint8), torch.tensor(1.0), torch.ones(3, 3)])
        )

        def mutate(meta, info, tensors):
            tensors["ghost"] = value
            if with_info:
                info["ghost"] = {
                    "shape": [3, 3],
                    "granularity": "element",
                    "length": 9,
                    "ones": 9,
                    "density": 1.0,
                }

        return kind, mutate, original
    if kind == "dtype":
        dtype = draw(
            st.sampled_from([torch.int8, torch.bool, torch.float16, torch.float32, torch.int64, torch.uint16])
        )

        def mutate(meta, info, tensors):
            t = tensors[name]
            if dtype == torch.bool:
                tensors[name] = t.clamp(max=1).bool()
            elif dtype == torch.int8:
                tensors[name] = t.view(torch.int8)
            else:
                tensors[name] = t.to(dtype)

        return kind, mutate, original
    if kind == "tensor_shape":

        def mutate(meta, info, tensors):
            tensors[name] = tensors[name].reshape(1, -1)

        return kind, mutate, original
    if kind == "tensor_size":
        grow = draw(st.booleans())

        def mutate(meta, info, tensors):
            t = tensors[name]
            tensors[name] = (
                torch.cat([t, torch.zeros(1, dtype=torch.uint8)]) if grow or not t.numel() else t[:-1]
            )

        return kind, mutate, original
    if kind == "padding":
        length = entry["length"]
        if length % 8 == 0:  # no padding bits in this tensor: flip a data bit without updating 'ones'
            if length == 0:
                return "drop_tensor", drop_tensor(name), original
            bit = draw(st.integers(0, length - 1))
        else:
            bit = draw(st.integers(length, (length + 7) // 8 * 8 - 1))

        def mutate(meta, info, tensors):
            t = tensors[name].clone()
            t[bit // 8] ^= 1 << (7 - bit % 8)
            tensors[name] = t

        return kind, mutate, original
    if kind == "tensors_json":
        text = draw(
            st.sampled_from(["{", "", "[]", "null", "3", '"x"', json.dumps(list(info)), "[" * 50_000])
        )

        def mutate(meta, info, tensors):
            meta["hfhooks.tensors"] = text

        return kind, mutate, original
    if kind == "tensors_missing":

        def mutate(meta, info, tensors):
            del meta["hfhooks.tensors"]

        return kind, mutate, original
    if kind == "semantics":
        value = draw(st.sampled_from(['"1=frozen"', '"0=trainable"', "null", '""', None]))

        def mutate(meta, info, tensors):
            if value is None:
                del meta["hfhooks.semantics"]
            else:
                meta["hfhooks.semantics"] = value

        return kind, mutate, original
    if kind == "stamp":
        key, value = draw(
            st.sampled_from(
                [
                    ("hfhooks.kind", "diff"),
                    ("hfhooks.kind", '"mask"'),
                    ("hfhooks.format_version", "2"),
                    ("hfhooks.format_version", '"1"'),
                    ("hfhooks.digest", "0" * 64),
                    ("hfhooks.digest", None),
                    ("hfhooks.kind", None),
                    ("hfhooks.format_version", None),
                ]
            )
        )

        def mutate(meta, info, tensors):
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value

        return kind, mutate, original, key != "hfhooks.digest"
    # bad JSON in another hfhooks.* value
    key = draw(st.sampled_from(["hfhooks.selection", "hfhooks.note", "hfhooks.extra"]))
    value = draw(st.sampled_from(["{", "[1,", "nan?", "", "'single'", "[" * 100_000 + "]" * 100_000]))

    def mutate(meta, info, tensors):
        meta[key] = value

    return kind, mutate, original


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(m=mutations())
def test_fuzz_inconsistent_metadata(m):
    kind, mutate, original, *rest = m
    note(f"mutation: {kind} of {original}")
    fd, name = tempfile.mkstemp(suffix=".safetensors", dir=_FUZZ_DIR)
    os.close(fd)
    try:
        craft(name, mutate, original, redigest=rest[0] if rest else True)
        with pytest.raises(MaskFileError):
            ParamMask.load(name)
    finally:
        os.unlink(name)


def _set_meta(key, value):
    def mutate(meta, info, tensors):
        meta[key] = value

    return mutate


def _extra_tensor(value, with_info):
    def mutate(meta, info, tensors):
        tensors["ghost"] = value
        if with_info:
            info["ghost"] = {"shape": [], "granularity": "element", "length": 1, "ones": 1, "density": 1.0}

    return mutate


EMBED = "model.embed.weight"  # (13, 7) element mask in element_mask()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (set_info(EMBED, "shape", [True, 91]), "invalid shape"),  # JSON true is a Python int
        (set_info(EMBED, "shape", [13.0, 7]), "invalid shape"),
        (set_info(EMBED, "shape", [2**33, 2**31]), "too many elements"),  # np.prod would wrap to 0
        (set_info(EMBED, "shape", [2**32, 2**32, 2**32]), "too many elements"),
        (set_info(EMBED, "length", 91.0), "length 91.0"),
        (set_info(EMBED, "ones", float(int(_bits((13, 7), 0.3, 1).sum()))), "ones"),
        (set_info(EMBED, "density", 0.5), "density"),
        (del_info(EMBED, "density"), "density"),
        (set_info("empty", "granularity", "column"), "length 0 does not match"),
        (_set_meta("hfhooks.semantics", '"1=frozen"'), "semantics"),
        (_set_meta("hfhooks.note", "[" * 100_000 + "]" * 100_000), "not valid JSON"),  # RecursionError
        (_extra_tensor(torch.tensor(1.0), with_info=True), "'ghost'"),  # 0-d fp32: digest used to crash
        (_extra_tensor(torch.tensor(1.0), with_info=False), "does not list exactly"),
        (_extra_tensor(torch.tensor(1, dtype=torch.uint8), with_info=False), "does not list exactly"),
    ],
)
def test_specific_inconsistencies(mutate, message, tmp_path):
    path = tmp_path / "m.safetensors"
    craft(path, mutate, "element")
    _expect(path, message)


def test_row_mask_of_parameter_with_zero_rows_has_a_density():
    mask = ParamMask.from_slices({"w": (0, [])}, {"w": (0, 5)})
    assert mask.counts() == {"w": (0, 0)}
    assert mask.density() == 0.0
