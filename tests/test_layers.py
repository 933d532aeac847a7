"""Decoder-layer discovery and the MLP-unit / attention-head selectors, verified functionally.

The structural facts below (block paths, which modules produce / consume MLP units, which hold q/k/v and the
output projection) are written out by hand per architecture, independently of :mod:`hfhooks.core.layers`. The
selectors are then checked by what zeroing or perturbing the selected slices does to a real forward pass,
compared with hooks that act on the hidden units / head outputs directly.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers
from conftest import ARCHS, GQA_ARCHS, HEADS, HIDDEN, KV_HEADS, LAYERS, lora, make_model, random_input_ids
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hfhooks import (
    LayerList,
    ParamIndex,
    ParamMask,
    attention_head_slices,
    find_layers,
    mlp_projections,
    mlp_unit_slices,
)
from hfhooks.core.blocks import layer_of, select_layers

ATOL = 1e-6


@dataclass(frozen=True)
class Layout:
    path: str  # canonical path of the block list
    blocks: Callable[[nn.Module], nn.ModuleList]
    producers: tuple[str, ...]  # MLP modules whose outputs are the hidden units (relative to the block)
    consumers: tuple[str, ...]  # MLP modules reading the hidden units
    width: int  # number of MLP hidden units
    qkv: tuple[str, ...] | None  # modules holding q/k/v (None: no supported attention layout)
    o: str | None  # output projection
    fused_gate_up: bool = False


LAYOUTS: dict[str, Layout] = {
    "llama": Layout(
        "model.layers",
        lambda m: m.model.layers,
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
        64,
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj",
    ),
    "gpt2": Layout(
        "transformer.h",
        lambda m: m.transformer.h,
        ("mlp.c_fc",),
        ("mlp.c_proj",),
        4 * HIDDEN,
        ("attn.c_attn",),
        "attn.c_proj",
    ),
    "neox": Layout(
        "gpt_neox.layers",
        lambda m: m.gpt_neox.layers,
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
        64,
        ("attention.query_key_value",),
        "attention.dense",
    ),
    "bert": Layout(
        "bert.encoder.layer",
        lambda m: m.bert.encoder.layer,
        ("intermediate.dense",),
        ("output.dense",),
        64,
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attention.output.dense",
    ),
    # Extra layouts hfhooks knows, built here only.
    "opt": Layout(
        "model.decoder.layers",
        lambda m: m.model.decoder.layers,
        ("fc1",),
        ("fc2",),
        48,
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.out_proj",
    ),
    "gptj": Layout(
        "transformer.h",
        lambda m: m.transformer.h,
        ("mlp.fc_in",),
        ("mlp.fc_out",),
        48,
        ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        "attn.out_proj",
    ),
    "phi3": Layout(
        "model.layers",
        lambda m: m.model.layers,
        ("mlp.gate_up_proj",),
        ("mlp.down_proj",),
        48,
        None,  # fused qkv_proj: not a supported attention layout
        None,
        fused_gate_up=True,
    ),
}
LAYOUTS["mistral"] = LAYOUTS["qwen2"] = LAYOUTS["llama"]

_EXTRA = {
    "opt": lambda: transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=64,
            hidden_size=HIDDEN,
            ffn_dim=48,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=32,
            word_embed_proj_dim=HIDDEN,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
    "gptj": lambda: transformers.GPTJForCausalLM(
        transformers.GPTJConfig(
            vocab_size=64,
            n_embd=HIDDEN,
            n_inner=48,
            n_layer=LAYERS,
            n_head=HEADS,
            rotary_dim=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
    "phi3": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(
            vocab_size=64,
            hidden_size=HIDDEN,
            intermediate_size=48,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
}
MLP_ARCHS = (*ARCHS, "opt", "gptj", "phi3")
ATTN_ARCHS = (*ARCHS, "opt", "gptj")


def build(arch: str, **overrides) -> nn.Module:
    if arch in _EXTRA:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _EXTRA[arch]().eval()
    return make_model(arch, **overrides)


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


# -- forward-pass helpers -------------------------------------------------------------------------------------


def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """All hidden states and the logits of one forward pass, flattened into one vector."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return torch.cat([h.reshape(-1) for h in out.hidden_states] + [out.logits.reshape(-1)])


def zero_input_columns(module: nn.Module, cols: torch.Tensor):
    """Forward pre-hook zeroing features ``cols`` of the module's input (hidden units / head outputs)."""

    def hook(_mod, args):
        x = args[0].clone()
        x[..., cols] = 0
        return (x, *args[1:])

    return module.register_forward_pre_hook(hook)


def captured_input(model: nn.Module, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_pre_hook(
        lambda _m, args: store.__setitem__("x", args[0].detach().clone())
    )
    try:
        forward(model, ids)
    finally:
        handle.remove()
    return store["x"]


def edit_slices(model: nn.Module, slices, names, how: str, seed: int = 0) -> None:
    """Zero / perturb the selected entries (``inside``) or all other entries (``outside``) of ``names``."""
    index = ParamIndex(model)
    mask = ParamMask.from_slices(slices, index)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            param = index.param(name)
            sel = mask[name] if name in mask else torch.zeros(param.shape, dtype=torch.bool)
            if how == "zero":
                param.masked_fill_(sel, 0.0)
            else:
                where = sel if how == "perturb_inside" else ~sel
                param.add_(torch.randn(param.shape, generator=g) * where)


def params_of(model: nn.Module, layout: Layout, layer: int, modules) -> list[str]:
    prefix = f"{layout.path}.{layer}."
    names = []
    for mod in modules:
        for leaf in ("weight", "bias"):
            if getattr(layout.blocks(model)[layer].get_submodule(mod), leaf, None) is not None:
                names.append(f"{prefix}{mod}.{leaf}")
    return names


def expected_units(units, width: int) -> list[int]:
    if isinstance(units, int):
        return list(range(width - units, width))
    return sorted({u % width for u in units})


# -- find_layers / layer_of / select_layers -----------------------------------------------------------------


@pytest.mark.parametrize("arch", MLP_ARCHS)
def test_find_layers(arch: str) -> None:
    model = build(arch)
    layout = LAYOUTS[arch]
    layers = find_layers(model)
    assert isinstance(layers, LayerList)
    assert layers.path == layout.path
    assert len(layers) == LAYERS
    blocks = layout.blocks(model)
    assert all(a is b for a, b in zip(layers.modules, blocks, strict=True))
    assert model.get_submodule(layers.path) is blocks
    assert [layers.prefix(i) for i in range(LAYERS)] == [f"{layout.path}.{i}" for i in range(LAYERS)]
    assert layers.prefix(-1) == f"{layout.path}.{LAYERS - 1}"
    with pytest.raises(IndexError, match="out of range"):
        layers.prefix(LAYERS)
    with pytest.raises(IndexError, match="out of range"):
        layers.prefix(-LAYERS - 1)


def test_find_layers_through_wrappers(arch: str, gloo_group) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    model = make_model(arch)
    layout = LAYOUTS[arch]
    blocks = list(layout.blocks(model))
    wrapped = {
        "compile": torch.compile(model),
        "ddp": DDP(model),
        "compile+ddp": torch.compile(DDP(model)),
    }
    for how, w in wrapped.items():
        layers = find_layers(w)
        assert layers.path == layout.path, how
        assert list(layers.modules) == blocks, how

    targets = {"gpt2": ["c_attn"], "neox": ["query_key_value"], "bert": ["query"]}.get(arch, ["q_proj"])
    pm = lora(model, targets)
    for w in (pm, torch.compile(pm), DDP(pm)):
        layers = find_layers(w)
        assert layers.path == layout.path
        assert all(a is b for a, b in zip(layers.modules, blocks, strict=True))  # LoRA injects in place

    block_type = type(blocks[0])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, block_type))
    layers = find_layers(model)
    assert layers.path == layout.path
    assert all(isinstance(m, CheckpointWrapper) for m in layers.modules)
    assert [m._checkpoint_wrapped_module for m in layers.modules] == blocks


def test_find_layers_fallback_picks_largest_uniform_module_list() -> None:
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # uniform but small
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.Conv1d(4, 4, 3)])  # large but not uniform
            self.trunk = nn.Sequential()
            self.trunk.stack = nn.ModuleList([Block() for _ in range(3)])

    model = Odd()
    layers = find_layers(model)
    assert layers.path == "trunk.stack"
    assert list(layers.modules) == list(model.trunk.stack)
    index = ParamIndex(model)
    assert index.select(layers=[2]) == ["trunk.stack.2.fc.weight", "trunk.stack.2.fc.bias"]
    assert layer_of("trunk.stack.1.fc.bias", layers) == 1
    assert layer_of("small.1.weight", layers) is None


def test_find_layers_prefers_known_paths_over_larger_lists() -> None:
    model = make_model("llama")
    model.extra = nn.ModuleList([nn.Linear(128, 128) for _ in range(3)])  # uniform and much larger
    assert find_layers(model).path == "model.layers"


def test_find_layers_without_block_list_raises() -> None:
    with pytest.raises(ValueError, match="Could not find the transformer block list of Sequential"):
        find_layers(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="Could not find"):
        find_layers(nn.ModuleList([nn.Linear(3, 3), nn.ReLU()]))  # not uniform


def test_layer_of(arch: str) -> None:
    model = make_model(arch)
    layers = find_layers(model)
    names = ParamIndex(model).names()
    seen = set()
    for name in names:
        got = layer_of(name, layers)
        if name.startswith(layers.path + "."):
            assert got == int(name[len(layers.path) + 1 :].split(".")[0])
            assert name.startswith(layers.prefix(got) + ".")
            seen.add(got)
        else:
            assert got is None, name
    assert seen == set(range(LAYERS))
    assert any(layer_of(n, layers) is None for n in names)  # embeddings / heads
    # a sibling whose name merely starts with the path is not a layer
    assert layer_of(layers.path + "_norm.weight", layers) is None
    assert layer_of(layers.path + ".weight", layers) is None


def test_select_layers() -> None:
    layers = find_layers(make_model("llama", num_hidden_layers=5))
    assert select_layers(layers, None) == [0, 1, 2, 3, 4]
    assert select_layers(layers, [3, 1, 3]) == [1, 3]
    assert select_layers(layers, [-1, 0]) == [0, 4]
    assert select_layers(layers, slice(1, None, 2)) == [1, 3]
    assert select_layers(layers, slice(-2, None)) == [3, 4]
    assert select_layers(layers, range(2)) == [0, 1]
    with pytest.raises(IndexError, match="out of range"):
        select_layers(layers, [5])
    with pytest.raises(IndexError, match="out of range"):
        select_layers(layers, [-6])


# -- MLP units ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MLP_ARCHS)
def test_mlp_projections(arch: str) -> None:
    model = build(arch)
    layout = LAYOUTS[arch]
    for layer in range(LAYERS):
        producers, consumers = mlp_projections(model, layer)
        prefix = f"{layout.path}.{layer}."
        assert producers == [prefix + p for p in layout.producers]
        assert consumers == [prefix + c for c in layout.consumers]
    assert mlp_projections(ParamIndex(model), -1) == mlp_projections(model, LAYERS - 1)


@pytest.mark.parametrize("arch", MLP_ARCHS)
@pytest.mark.parametrize(("layer", "units"), [(0, 5), (1, [0, 7, 31, -1]), (-1, 1)])
def test_mlp_unit_slices_layout(arch: str, layer: int, units) -> None:
    """Exactly the producer weights (+ biases) and the consumer weights, along the right axis."""
    model = build(arch)
    layout = LAYOUTS[arch]
    block = layout.blocks(model)[layer]
    prefix = f"{layout.path}.{layer % LAYERS}."
    want = torch.tensor(expected_units(units, layout.width))
    slices = mlp_unit_slices(model, layer, units)

    expected_keys = set()
    for p in layout.producers:
        mod = block.get_submodule(p)
        rows = torch.cat([want, want + layout.width]) if layout.fused_gate_up else want
        axis, idx = slices[f"{prefix}{p}.weight"]
        assert axis == (1 if is_conv1d(mod) else 0)
        assert torch.equal(torch.sort(idx).values, torch.sort(rows).values)
        expected_keys.add(f"{prefix}{p}.weight")
        if getattr(mod, "bias", None) is not None:
            axis, idx = slices[f"{prefix}{p}.bias"]
            assert axis == 0 and torch.equal(torch.sort(idx).values, torch.sort(rows).values)
            expected_keys.add(f"{prefix}{p}.bias")
    for c in layout.consumers:
        mod = block.get_submodule(c)
        axis, idx = slices[f"{prefix}{c}.weight"]
        assert axis == (0 if is_conv1d(mod) else 1)
        assert torch.equal(torch.sort(idx).values, want)
        expected_keys.add(f"{prefix}{c}.weight")  # the consumer's bias is not per unit
    assert set(slices) == expected_keys
    # the slices turn into a valid row/column mask of the right size
    mask = ParamMask.from_slices(slices, model)
    assert mask.validate(model).keys() == slices.keys()
    for name, (axis, idx) in slices.items():
        assert int(mask[name].sum()) == len(idx) * (
            mask.shape(name)[1 - axis] if len(mask.shape(name)) == 2 else 1
        )


@pytest.mark.parametrize("arch", MLP_ARCHS)
@pytest.mark.parametrize(("layer", "units"), [(0, 5), (1, [0, 7, 31, -1]), (1, 16)])
def test_mlp_unit_slices_zeroing_equals_zeroing_activations(arch: str, layer: int, units) -> None:
    """Zeroing the selected rows/columns == zeroing those hidden units' activations before the down projection."""
    model = build(arch)
    layout = LAYOUTS[arch]
    ids = random_input_ids()
    down = layout.blocks(model)[layer].get_submodule(layout.consumers[0])
    want = expected_units(units, layout.width)

    baseline = forward(model, ids)
    handle = zero_input_columns(down, torch.tensor(want))
    reference = forward(model, ids)
    handle.remove()
    assert not torch.allclose(reference, baseline, atol=1e-4)  # the units matter

    edited = copy.deepcopy(model)
    slices = mlp_unit_slices(edited, layer, units)
    edit_slices(edited, slices, slices, "zero")
    torch.testing.assert_close(forward(edited, ids), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", MLP_ARCHS)
def test_mlp_unit_slices_producers_cover_exactly_the_units(arch: str) -> None:
    """The producer slices hold everything the selected units depend on, and nothing other units depend on."""
    model = build(arch)
    layout = LAYOUTS[arch]
    layer, units = 1, [1, 2, 30, 40]
    ids = random_input_ids()
    down = layout.blocks(model)[layer].get_submodule(layout.consumers[0])
    sel = torch.zeros(layout.width, dtype=torch.bool)
    sel[expected_units(units, layout.width)] = True
    base = captured_input(model, down, ids)
    slices = mlp_unit_slices(model, layer, units)
    producers = params_of(model, layout, layer, layout.producers)
    assert set(producers) <= set(slices)

    outside = copy.deepcopy(model)
    edit_slices(outside, slices, producers, "perturb_outside")
    got = captured_input(outside, layout.blocks(outside)[layer].get_submodule(layout.consumers[0]), ids)
    torch.testing.assert_close(got[..., sel], base[..., sel], atol=ATOL, rtol=0)
    assert not torch.allclose(got[..., ~sel], base[..., ~sel], atol=1e-4)

    inside = copy.deepcopy(model)
    edit_slices(inside, slices, producers, "perturb_inside")
    got = captured_input(inside, layout.blocks(inside)[layer].get_submodule(layout.consumers[0]), ids)
    torch.testing.assert_close(got[..., ~sel], base[..., ~sel], atol=ATOL, rtol=0)
    assert not torch.allclose(got[..., sel], base[..., sel], atol=1e-4)

    zeroed = copy.deepcopy(model)
    edit_slices(zeroed, slices, producers, "zero")
    got = captured_input(zeroed, layout.blocks(zeroed)[layer].get_submodule(layout.consumers[0]), ids)
    assert torch.all(got[..., sel] == 0)  # act(0) == 0 for SiLU / GELU, and gate * up with both zero
    torch.testing.assert_close(got[..., ~sel], base[..., ~sel], atol=ATOL, rtol=0)


def test_mlp_unit_slices_same_through_wrappers(gloo_group) -> None:
    model = make_model("gpt2")
    plain = mlp_unit_slices(model, 1, [3, 9])
    for wrapped in (lora(model, ["c_fc", "c_proj"]), torch.compile(model), DDP(model)):
        got = mlp_unit_slices(wrapped, 1, [3, 9])
        assert list(got) == list(plain)
        for name, (axis, idx) in plain.items():
            assert got[name][0] == axis and torch.equal(got[name][1], idx)
    assert mlp_unit_slices(ParamIndex(model), 1, [3, 9]).keys() == plain.keys()


def test_mlp_unit_slices_errors() -> None:
    model = make_model("llama")  # 64 units, 2 layers
    assert len(mlp_unit_slices(model, 0, 64)["model.layers.0.mlp.down_proj.weight"][1]) == 64
    for bad in (65, 0, -1, [64], [-65], [0, 64], []):
        with pytest.raises(ValueError):
            mlp_unit_slices(model, 0, bad)
    with pytest.raises(ValueError, match="last 65 MLP units: the layer has 64"):
        mlp_unit_slices(model, 0, 65)
    for layer in (LAYERS, -LAYERS - 1):
        with pytest.raises(IndexError, match="out of range"):
            mlp_unit_slices(model, layer, 4)
    # duplicates and negative indices collapse to the same units
    a = mlp_unit_slices(model, 0, [63, -1, 2, 2])
    b = mlp_unit_slices(model, 0, [2, 63])
    assert all(torch.equal(a[n][1], b[n][1]) for n in b)
    assert mlp_unit_slices(model, -1, 3).keys() == mlp_unit_slices(model, 1, 3).keys()


def test_mlp_unknown_layout_raises() -> None:
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = nn.Linear(4, 4)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match=r"Unrecognised MLP layout in layers\.0"):
        mlp_unit_slices(M(), 0, 1)


# -- attention heads ----------------------------------------------------------------------------------------


def _kv_heads(arch: str, q_heads: list[int], n_q: int = HEADS, n_kv: int | None = None) -> list[int]:
    if n_kv is None:
        n_kv = KV_HEADS if arch in GQA_ARCHS else n_q
    group = n_q // n_kv
    return [j for j in range(n_kv) if all(h in q_heads for h in range(j * group, (j + 1) * group))]


def _q_heads(heads, n_q: int = HEADS) -> list[int]:
    return expected_units(heads, n_q)


HEAD_SELECTIONS = [1, 2, [0], [1, 2], [0, 3], [0, 1, 3], 4]


@pytest.mark.parametrize("arch", ATTN_ARCHS)
@pytest.mark.parametrize("heads", HEAD_SELECTIONS)
def test_attention_head_slices_zeroing_equals_zeroing_head_outputs(arch: str, heads) -> None:
    """Zeroing the q/k/v/o slices == zeroing the heads' outputs at the output projection's input.

    Any q/k/v row belonging to an unselected head (e.g. a KV head shared with an unselected query head)
    would change the other heads and break the equality; a missing output-projection column would too.
    """
    model = build(arch)
    layout = LAYOUTS[arch]
    layer = 1
    ids = random_input_ids()
    d = HIDDEN // HEADS
    q = _q_heads(heads)
    cols = torch.tensor([h * d + i for h in q for i in range(d)])
    o_proj = layout.blocks(model)[layer].get_submodule(layout.o)

    baseline = forward(model, ids)
    handle = zero_input_columns(o_proj, cols)
    reference = forward(model, ids)
    handle.remove()
    assert not torch.allclose(reference, baseline, atol=1e-4)

    edited = copy.deepcopy(model)
    slices = attention_head_slices(edited, layer, heads)
    edit_slices(edited, slices, slices, "zero")
    torch.testing.assert_close(forward(edited, ids), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ATTN_ARCHS)
@pytest.mark.parametrize("heads", [1, [1, 2], [0, 1, 3]])
def test_attention_head_slices_qkv_cover_exactly_the_heads(arch: str, heads) -> None:
    """Per head output (the output projection's input): a selected head whose KV head is included depends on
    nothing outside the q/k/v slices; an unselected head depends on nothing inside them."""
    model = build(arch)
    layout = LAYOUTS[arch]
    layer = 0
    ids = random_input_ids()
    d = HIDDEN // HEADS
    q = _q_heads(heads)
    kv = _kv_heads(arch, q)
    group = HEADS // (KV_HEADS if arch in GQA_ARCHS else HEADS)
    full = [h for h in q if h // group in kv]  # selected heads whose KV head is selected too
    others = [h for h in range(HEADS) if h not in q]

    def cols(hs):
        return torch.tensor([h * d + i for h in hs for i in range(d)], dtype=torch.long)

    def head_outputs(m):
        return captured_input(m, layout.blocks(m)[layer].get_submodule(layout.o), ids)

    base = head_outputs(model)
    slices = attention_head_slices(model, layer, heads)
    qkv = params_of(model, layout, layer, layout.qkv)
    assert set(slices) - set(qkv) == {f"{layout.path}.{layer}.{layout.o}.weight"}

    outside = copy.deepcopy(model)
    edit_slices(outside, slices, qkv, "perturb_outside")
    got = head_outputs(outside)
    if full:
        torch.testing.assert_close(got[..., cols(full)], base[..., cols(full)], atol=ATOL, rtol=0)
    assert not torch.allclose(got[..., cols(others)], base[..., cols(others)], atol=1e-4)

    inside = copy.deepcopy(model)
    edit_slices(inside, slices, qkv, "perturb_inside")
    got = head_outputs(inside)
    torch.testing.assert_close(got[..., cols(others)], base[..., cols(others)], atol=ATOL, rtol=0)
    assert not torch.allclose(got[..., cols(q)], base[..., cols(q)], atol=1e-4)

    zeroed = copy.deepcopy(model)
    edit_slices(zeroed, slices, qkv, "zero")
    got = head_outputs(zeroed)
    if full:  # v == 0 for these heads, so their outputs vanish
        assert torch.all(got[..., cols(full)] == 0)
    torch.testing.assert_close(got[..., cols(others)], base[..., cols(others)], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "heads", "n_q", "n_kv", "d"),
    [
        ({"head_dim": 16}, [1, 2, 3], 4, 2, 16),  # head_dim != hidden / heads
        ({"num_key_value_heads": 1}, 3, 4, 1, 8),  # multi-query: KV head only when all heads go
        ({"num_key_value_heads": 1}, 4, 4, 1, 8),
        ({"num_key_value_heads": 4}, [0, 2], 4, 4, 8),  # plain multi-head attention
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, [4, 5, 6, 7, 0], 8, 2, 4),
    ],
)
def test_attention_head_slices_llama_variants(overrides, heads, n_q, n_kv, d) -> None:
    model = make_model("llama", **overrides)
    ids = random_input_ids()
    q = _q_heads(heads, n_q)
    kv = _kv_heads("llama", q, n_q, n_kv)
    slices = attention_head_slices(model, 0, heads)
    p = "model.layers.0.self_attn."
    spans = lambda hs: torch.tensor([h * d + i for h in hs for i in range(d)], dtype=torch.long)  # noqa: E731
    assert torch.equal(slices[p + "q_proj.weight"][1], spans(q))
    assert torch.equal(slices[p + "o_proj.weight"][1], spans(q))
    if kv:
        assert torch.equal(slices[p + "k_proj.weight"][1], spans(kv))
        assert torch.equal(slices[p + "v_proj.weight"][1], spans(kv))
    else:
        assert p + "k_proj.weight" not in slices and p + "v_proj.weight" not in slices

    o_proj = model.model.layers[0].self_attn.o_proj
    handle = zero_input_columns(o_proj, spans(q))
    reference = forward(model, ids)
    handle.remove()
    edited = copy.deepcopy(model)
    edit_slices(edited, slices, slices, "zero")
    torch.testing.assert_close(forward(edited, ids), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", GQA_ARCHS)
def test_gqa_rule(arch: str) -> None:
    """4 query heads share 2 KV heads (groups {0, 1} and {2, 3}): a KV head is selected only with its whole group."""
    model = make_model(arch)
    p = "model.layers.0.self_attn."
    has_bias = arch == "qwen2"

    def kv_rows(heads):
        s = attention_head_slices(model, 0, heads)
        assert (p + "k_proj.weight" in s) == (p + "v_proj.weight" in s)
        assert (p + "k_proj.bias" in s) == (has_bias and p + "k_proj.weight" in s)
        assert (p + "q_proj.bias" in s) == has_bias
        assert p + "o_proj.bias" not in s
        if p + "k_proj.weight" not in s:
            return None
        assert torch.equal(s[p + "k_proj.weight"][1], s[p + "v_proj.weight"][1])
        assert s[p + "k_proj.weight"][0] == 0
        if has_bias:
            assert torch.equal(s[p + "k_proj.bias"][1], s[p + "k_proj.weight"][1])
        return s[p + "k_proj.weight"][1].tolist()

    for one_of_group in ([0], [1], [2], [3], 1, [1, 2], [0, 3]):
        assert kv_rows(one_of_group) is None, one_of_group
    assert kv_rows([0, 1]) == list(range(0, 8))
    assert kv_rows(2) == list(range(8, 16))  # the last 2 heads = group 1
    assert kv_rows([0, 1, 3]) == list(range(0, 8))
    assert kv_rows([3, 2, 0]) == list(range(8, 16))
    assert kv_rows(4) == list(range(16))
    s = attention_head_slices(model, 0, [3])
    assert s[p + "q_proj.weight"][0] == 0 and s[p + "q_proj.weight"][1].tolist() == list(range(24, 32))
    assert s[p + "o_proj.weight"][0] == 1 and s[p + "o_proj.weight"][1].tolist() == list(range(24, 32))


def test_fused_attention_layouts_exact_indices() -> None:
    # GPT-2: Conv1D c_attn (32, 96) with columns [q | k | v]; head h spans 8 columns in each third.
    s = attention_head_slices(make_model("gpt2"), 0, [1, 3])
    h1, h3 = list(range(8, 16)), list(range(24, 32))
    cols = h1 + h3 + [32 + c for c in h1 + h3] + [64 + c for c in h1 + h3]
    assert s["transformer.h.0.attn.c_attn.weight"][0] == 1
    assert s["transformer.h.0.attn.c_attn.weight"][1].tolist() == cols
    assert s["transformer.h.0.attn.c_attn.bias"][1].tolist() == cols
    assert s["transformer.h.0.attn.c_proj.weight"][0] == 0  # Conv1D: rows read the head outputs
    assert s["transformer.h.0.attn.c_proj.weight"][1].tolist() == h1 + h3
    assert set(s) == {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
    }
    # GPT-NeoX: query_key_value (96, 32), rows interleaved per head [q_h | k_h | v_h] (24 rows per head).
    s = attention_head_slices(make_model("neox"), 1, [2])
    assert s["gpt_neox.layers.1.attention.query_key_value.weight"][0] == 0
    assert s["gpt_neox.layers.1.attention.query_key_value.weight"][1].tolist() == list(range(48, 72))
    assert s["gpt_neox.layers.1.attention.query_key_value.bias"][1].tolist() == list(range(48, 72))
    assert s["gpt_neox.layers.1.attention.dense.weight"][0] == 1
    assert s["gpt_neox.layers.1.attention.dense.weight"][1].tolist() == list(range(16, 24))
    assert "gpt_neox.layers.1.attention.dense.bias" not in s


def test_attention_head_slices_same_through_wrappers(gloo_group) -> None:
    model = make_model("qwen2")
    plain = attention_head_slices(model, 1, [0, 1, 3])
    assert "model.layers.1.self_attn.k_proj.bias" in plain
    for wrapped in (lora(model, ["q_proj", "k_proj", "o_proj"]), torch.compile(model), DDP(model)):
        got = attention_head_slices(wrapped, 1, [0, 1, 3])
        assert list(got) == list(plain)
        for name, (axis, idx) in plain.items():
            assert got[name][0] == axis and torch.equal(got[name][1], idx)
    assert attention_head_slices(ParamIndex(model), -1, [0, 1, 3]).keys() == plain.keys()


def test_attention_head_slices_errors() -> None:
    model = make_model("llama")
    for bad in (5, 0, [4], [-5], []):
        with pytest.raises(ValueError):
            attention_head_slices(model, 0, bad)
    with pytest.raises(ValueError, match="last 5 attention heads: the layer has 4"):
        attention_head_slices(model, 0, 5)
    for layer in (LAYERS, -LAYERS - 1):
        with pytest.raises(IndexError, match="out of range"):
            attention_head_slices(model, layer, 1)
    with pytest.raises(ValueError, match="Unrecognised attention layout"):
        attention_head_slices(build("phi3"), 0, 1)  # fused qkv_proj is not supported
