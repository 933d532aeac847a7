"""Checkpoint I/O: lazy reading of single-file / sharded / adapter / pickled checkpoints, streaming atomic edits,
crash safety under SIGKILL, and clean errors for malformed headers and indexes (fuzzed)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from hfhooks.core.params import UnknownParameterError
from hfhooks.io.checkpoints import INDEX_NAME, Checkpoint, CheckpointError, layer_map
from hfhooks.io.edit import edit_checkpoint
from hfhooks.io.safetensors import ReadBuffer, read_safetensors_header

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded, and the CI machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save(model, path: Path, shard: str | None = None) -> Path:
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def digest_tree(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# -- reading ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_single_and_sharded_read_the_same(tmp_path, arch):
    model = make_model(arch)
    single = Checkpoint(save(model, tmp_path / "single"))
    sharded = Checkpoint(save(model, tmp_path / "sharded", "20KB"))
    assert single.kind == "single" and sharded.kind == "sharded" and len(sharded.files) > 2
    assert set(single.keys()) == set(sharded.keys())
    sd = model.state_dict()
    for name in single:
        assert torch.equal(single.get(name), sharded.get(name))
        assert torch.equal(single.get(name), sd[name])
    assert single.nbytes == sharded.nbytes
    assert single.config["model_type"] == model.config.model_type


def test_single_file_path_and_lone_file(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    save_file(t, tmp_path / "weights.safetensors")
    for path in (tmp_path / "weights.safetensors", tmp_path):
        ckpt = Checkpoint(path)
        assert ckpt.kind == "single"
        assert torch.equal(ckpt.get("a"), t["a"]) and torch.equal(ckpt.get("b"), t["b"])
    with pytest.raises(UnknownParameterError, match="Nearest: a"):
        Checkpoint(tmp_path).info("aa")


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        Checkpoint(tmp_path)


def test_pickles_refused_unless_allowed(tmp_path):
    model = make_model("llama")
    (tmp_path / "ckpt").mkdir()
    torch.save(model.state_dict(), tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        Checkpoint(tmp_path / "ckpt")
    ckpt = Checkpoint(tmp_path / "ckpt", allow_pickle=True)
    assert ckpt.kind == "pickle"
    assert torch.equal(ckpt.get("model.norm.weight"), model.model.norm.weight)
    # an edit of a pickled checkpoint always writes safetensors
    out = edit_checkpoint(ckpt, tmp_path / "out", {}, progress=False)
    assert Checkpoint(out).kind == "single" and not list(out.glob("*.bin"))
    assert torch.equal(Checkpoint(out).get("lm_head.weight"), model.lm_head.weight)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_not_executed(tmp_path):
    (tmp_path / "ckpt").mkdir()
    torch.save({"w": torch.zeros(2), "x": _Evil()}, tmp_path / "ckpt" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(tmp_path / "ckpt", allow_pickle=True)


def test_layer_map_from_names():
    path, of = layer_map(
        ["model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight", "model.norm.weight"]
    )
    assert path == "model.layers"
    assert of == {
        "model.embed_tokens.weight": None,
        "model.layers.3.mlp.up_proj.weight": 3,
        "model.norm.weight": None,
    }
    assert layer_map(["transformer.h.11.attn.c_attn.weight"])[1] == {
        "transformer.h.11.attn.c_attn.weight": 11
    }
    adapter = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    assert layer_map([adapter]) == ("model.layers", {adapter: 2})
    assert layer_map(["embed.weight", "head.weight"]) == (None, {"embed.weight": None, "head.weight": None})


# -- editing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_identity_edit_round_trips_through_transformers(tmp_path, shard):
    model = make_model("llama")
    src = save(model, tmp_path / "src", shard)
    (src / "tokenizer_config.json").write_text("{}")
    (src / "trainer_state.json").write_text("{}")
    torch.save({"x": 1}, src / "optimizer.pt")
    before = digest_tree(src)
    out = edit_checkpoint(src, tmp_path / "out", {}, record={"op": "noop"}, progress=False)
    assert digest_tree(src) == before
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "generation_config.json" in names and "tokenizer_config.json" in names
    assert "optimizer.pt" not in names and "trainer_state.json" not in names
    assert not [n for n in names if n.startswith(".")]
    src_ckpt, out_ckpt = Checkpoint(src), Checkpoint(out)
    assert out_ckpt.kind == src_ckpt.kind and [f.name for f in out_ckpt.files] == [
        f.name for f in src_ckpt.files
    ]
    for f in out_ckpt.files:
        with safe_open(f, "pt") as g:
            meta = g.metadata()
        assert meta["format"] == "pt"
        assert json.loads(meta["hfhooks.edits"])[-1]["op"] == "noop"
    if shard:
        index = json.loads((out / INDEX_NAME).read_text())
        assert index["metadata"]["hfhooks.edits"][-1]["op"] == "noop"
        assert index["metadata"]["total_size"] == src_ckpt.nbytes
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out)
    for (n, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), n


def test_edit_replaces_only_named_tensors_and_keeps_history(tmp_path):
    model = make_model("gpt2")
    src = save(model, tmp_path / "src", "20KB")
    name = "transformer.h.1.mlp.c_fc.weight"
    out = edit_checkpoint(
        src, tmp_path / "a", {name: lambda load: load() * 0 + 1}, record={"op": "one"}, progress=False
    )
    out2 = edit_checkpoint(out, tmp_path / "b", {}, record={"op": "two"}, progress=False)
    a, b = Checkpoint(src), Checkpoint(out2)
    for n in a:
        expected = torch.ones_like(a.get(n)) if n == name else a.get(n)
        assert torch.equal(b.get(n), expected), n
    with safe_open(b.info(name).file, "pt") as f:
        assert [r["op"] for r in json.loads(f.metadata()["hfhooks.edits"])] == ["one", "two"]


@pytest.mark.parametrize(("shard_in", "shard_out", "files"), [(None, "20KB", "many"), ("20KB", "10GB", 1)])
def test_resharding(tmp_path, shard_in, shard_out, files):
    model = make_model("llama")
    src = save(model, tmp_path / "src", shard_in)
    out = edit_checkpoint(src, tmp_path / "out", {}, max_shard_size=shard_out, progress=False)
    ckpt = Checkpoint(out)
    assert (len(ckpt.files) > 1) if files == "many" else len(ckpt.files) == 1
    assert (out / INDEX_NAME).exists() == (files == "many")
    src_ckpt = Checkpoint(src)
    for n in src_ckpt:
        assert torch.equal(ckpt.get(n), src_ckpt.get(n))
    transformers.LlamaForCausalLM.from_pretrained(out)  # loads


def test_existing_output_needs_overwrite(tmp_path):
    src = save(make_model("llama"), tmp_path / "src")
    out = edit_checkpoint(src, tmp_path / "out", {}, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        edit_checkpoint(src, out, {}, progress=False)
    (out / "stale.txt").write_text("old")
    edit_checkpoint(src, out, {"model.norm.weight": lambda load: load() * 2}, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists()
    assert torch.equal(Checkpoint(out).get("model.norm.weight"), 2 * Checkpoint(src).get("model.norm.weight"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_in_place_edit_keeps_other_files_and_open_readers(tmp_path):
    model = make_model("llama")
    src = save(model, tmp_path / "ckpt", "20KB")
    torch.save({"step": 3}, src / "optimizer.pt")
    (src / "sub").mkdir()
    (src / "sub" / "note.txt").write_text("kept")
    name = "model.layers.0.mlp.up_proj.weight"
    info = Checkpoint(src).info(name)
    reader = safe_open(info.file, "pt")  # a reader that memory-maps the old shard
    old = reader.get_tensor(name).clone()
    edit_checkpoint(src, None, {name: lambda load: torch.zeros_like(load())}, progress=False)
    assert torch.equal(reader.get_tensor(name), old)  # the old file was never rewritten under the reader
    assert (src / "optimizer.pt").exists() and (src / "sub" / "note.txt").read_text() == "kept"
    assert Checkpoint(src).get(name).abs().sum() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_bad_edits_leave_nothing_behind(tmp_path):
    src = save(make_model("llama"), tmp_path / "src", "20KB")
    before = digest_tree(src)
    with pytest.raises(ValueError, match=r"must keep the source's torch.float32"):
        edit_checkpoint(
            src, tmp_path / "out", {"model.norm.weight": lambda load: load().double()}, progress=False
        )
    with pytest.raises(ValueError, match="must keep"):
        edit_checkpoint(src, tmp_path / "out", {"model.norm.weight": lambda load: load()[:3]}, progress=False)
    with pytest.raises(UnknownParameterError, match="model.norm.weight"):
        edit_checkpoint(src, tmp_path / "out", {"model.norm.weights": lambda load: load()}, progress=False)

    def boom(load):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        edit_checkpoint(src, tmp_path / "out", {"lm_head.weight": boom}, progress=False)
    assert digest_tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_written_shards_are_valid_safetensors_for_odd_tensors(tmp_path):
    tensors = {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "f16": torch.randn(7).half(),
        "i64": torch.arange(9),
        "flag": torch.tensor([True, False, True]),
    }
    (tmp_path / "src").mkdir()  # the output may not lie inside the source directory
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    edits = {"bf16": lambda load: load() * 2, "scalar": lambda load: load() + 1}
    out = edit_checkpoint(tmp_path / "src", tmp_path / "out", edits, progress=False)
    infos, meta = read_safetensors_header(out / "model.safetensors")
    assert meta["format"] == "pt" and set(infos) == set(tensors)
    with safe_open(out / "model.safetensors", "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for k, v in tensors.items():
        expected = v * 2 if k == "bf16" else v + 1 if k == "scalar" else v
        assert got[k].dtype == v.dtype and torch.equal(got[k], expected), k


# -- crash safety ----------------------------------------------------------------------------------------------
_KILL_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from hfhooks.io.checkpoints import Checkpoint
    from hfhooks.io.edit import edit_checkpoint

    src, out, marker, name = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]

    def stall(load):
        marker.write_text("first shard written")
        time.sleep(120)
        return load()

    edit_checkpoint(src, None if out == "-" else out, {name: stall}, progress=False)
    """
)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~10 s on a loaded 2-core machine
@pytest.mark.parametrize("in_place", [False, True])
def test_sigkill_mid_edit_leaves_source_intact_and_no_output(tmp_path, in_place):
    model = make_model("llama")
    src = save(model, tmp_path / "src", "20KB")
    ckpt = Checkpoint(src)
    last_file = ckpt.files[-1]
    name = next(n for n in ckpt if ckpt.info(n).file == last_file)  # stalls in the last shard
    before = digest_tree(src)
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(src), "-" if in_place else str(out), str(marker), name],
        env=env,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "the edit process died before reaching the stall"
            assert time.time() < deadline, "the edit never reached the stalled tensor"
            time.sleep(0.05)
        temps = [p for p in tmp_path.iterdir() if ".hfhooks-" in p.name]
        assert len(temps) == 1 and any(p.suffix == ".safetensors" for p in temps[0].iterdir())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert digest_tree(src) == before  # the source is intact
    assert not out.exists()  # no half-written output under the real name
    # the orphaned temporary directory is cleaned up by the next edit of the same output
    edit_checkpoint(src, None if in_place else out, {}, progress=False)
    assert not [p for p in tmp_path.iterdir() if ".hfhooks-" in p.name]


# -- malformed files -------------------------------------------------------------------------------------------
def _header_file(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        (b"{not json", b"", "not valid UTF-8 JSON"),
        ([1, 2], b"", "not a JSON object"),
        ({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not hold"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 2, "truncated"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlap or gap",
        ),
        ({"__metadata__": {"a": 1}}, b"", "strings to strings"),
    ],
)
def test_malformed_headers(tmp_path, header, data, match):
    path = _header_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as err:
        read_safetensors_header(path)
    assert str(path) in str(err.value)


def _sharded(tmp_path: Path) -> Path:
    return save(make_model("llama"), tmp_path / "src", "20KB")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda idx: "not json", "not a readable JSON index"),
        (lambda idx: {"metadata": {}}, "no 'weight_map'"),
        (lambda idx: {**idx, "metadata": [1]}, "'metadata' must be a JSON object"),
        (
            lambda idx: {"weight_map": {**idx["weight_map"], "model.norm.weight": "../escape.safetensors"}},
            "outside",
        ),
        (
            lambda idx: {"weight_map": {**idx["weight_map"], "model.norm.weight": "/abs.safetensors"}},
            "outside",
        ),
        (lambda idx: {"weight_map": {**idx["weight_map"], "model.norm.weight": 3}}, "not a file name"),
        (
            lambda idx: {"weight_map": {**idx["weight_map"], "ghost": "model-00099-of-00099.safetensors"}},
            "do not exist",
        ),
        (lambda idx: {"weight_map": {k: v for k, v in list(idx["weight_map"].items())[1:]}}, "stale"),
        (
            lambda idx: {
                "weight_map": {**idx["weight_map"], "phantom": next(iter(idx["weight_map"].values()))}
            },
            "no shard holds it",
        ),
    ],
)
def test_malformed_indexes(tmp_path, mutate, match):
    src = _sharded(tmp_path)
    index = json.loads((src / INDEX_NAME).read_text())
    new = mutate(index)
    (src / INDEX_NAME).write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(src)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(FUZZ, max_examples=150)
@given(index=json_values | st.dictionaries(st.sampled_from(["weight_map", "metadata", "x"]), json_values))
def test_fuzzed_index_gives_clean_errors(tmp_path_factory, index):
    d = tmp_path_factory.mktemp("idx")
    save_file({"a": torch.zeros(2)}, d / "model-00001-of-00001.safetensors")
    (d / INDEX_NAME).write_text(json.dumps(index))
    try:
        ckpt = Checkpoint(d)
    except CheckpointError:
        return
    assert ckpt.keys() == ["a"]  # only a consistent index is accepted


@settings(FUZZ, max_examples=300)
@given(blob=st.binary(max_size=200))
def test_fuzzed_bytes_give_clean_errors(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("bytes")
    (d / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError):
        Checkpoint(d)


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzzed_header_mutations_give_clean_errors(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("mut")
    save_file(
        {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}, d / "model.safetensors"
    )
    raw = bytearray((d / "model.safetensors").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    (d / "model.safetensors").write_bytes(bytes(raw))
    try:
        ckpt = Checkpoint(d)
        for n in ckpt:
            ckpt.get(n)
    except CheckpointError:
        pass


def test_read_buffer_reads_exact_tensors_is_reused_and_reports_truncation(tmp_path):
    tensors = {
        "a": torch.randn(300, 7),
        "b": torch.arange(10, dtype=torch.int64),
        "c": torch.randn(5).bfloat16(),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    infos, _ = read_safetensors_header(tmp_path / "m.safetensors")
    buf = ReadBuffer()
    first = buf.read(infos["a"])
    assert torch.equal(first, tensors["a"])
    for name in ("b", "c"):
        got = buf.read(infos[name])
        assert got.dtype == tensors[name].dtype and torch.equal(got, tensors[name])
    assert buf.read(infos["a"]).data_ptr() == first.data_ptr()  # one buffer, reused: no new allocation
    with open(tmp_path / "m.safetensors", "r+b") as f:  # truncated after the header was read
        f.truncate(infos["a"].start + 10)
    with pytest.raises(CheckpointError, match="truncated while reading tensor 'a'"):
        buf.read(infos["a"])
