"""Canonical parameter names and :class:`ParamIndex` across DDP / FSDP1 / torch.compile / PEFT wrappers."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import LAYERS, lora, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hfhooks import ParamIndex, ParamMask, UnknownParameterError, canonical_name, find_layers, unwrap_model

# -- canonical_name ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wrapped", "canonical"),
    [
        # DDP
        ("module.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        # torch.compile
        ("_orig_mod.transformer.h.1.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"),
        # compile of a single submodule (in the middle of a name)
        ("model.layers.0._orig_mod.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        # PEFT LoRA: base_model.model. prefix and .base_layer
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",
            "model.layers.0.self_attn.q_proj.bias",
        ),
        # PEFT LoRA adapter weights keep their own segments
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
            "model.layers.0.self_attn.q_proj.lora_A.default.weight",
        ),
        # PEFT modules_to_save: both the trainable copy and the shadowed original map to the base name
        ("base_model.model.score.modules_to_save.default.weight", "score.weight"),
        ("base_model.model.classifier.modules_to_save.my_adapter.bias", "classifier.bias"),
        ("base_model.model.lm_head.original_module.weight", "lm_head.weight"),
        ("base_model.model.model.embed_tokens.modules_to_save.default.weight", "model.embed_tokens.weight"),
        # FSDP1 (root and nested wrapping units)
        (
            "_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
        ),
        # activation checkpointing (wrapper around each block, or around the root)
        (
            "model.layers.3._checkpoint_wrapped_module.self_attn.o_proj.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ),
        ("_checkpoint_wrapped_module.lm_head.weight", "lm_head.weight"),
        # combinations
        (
            "module._orig_mod.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        ("_orig_mod.module.transformer.wte.weight", "transformer.wte.weight"),
        (
            "module.base_model.model.model.layers.1._checkpoint_wrapped_module.mlp.down_proj.base_layer.weight",
            "model.layers.1.mlp.down_proj.weight",
        ),
        (
            "_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module."
            "_checkpoint_wrapped_module.self_attn.v_proj.base_layer.weight",
            "model.layers.0.self_attn.v_proj.weight",
        ),
        ("module._orig_mod.base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
        (
            "_orig_mod.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
            "model.layers.0.self_attn.q_proj.lora_B.default.weight",
        ),
        # already canonical: unchanged
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        ("lm_head.weight", "lm_head.weight"),
        # look-alike segments of real models are not wrapper segments
        ("model.module_list.0.weight", "model.module_list.0.weight"),
        ("encoder.module.weight", "encoder.module.weight"),
        ("base_model_head.weight", "base_model_head.weight"),
        ("model.base_layer_norm.weight", "model.base_layer_norm.weight"),
        ("my_orig_mod.weight", "my_orig_mod.weight"),
    ],
)
def test_canonical_name(wrapped: str, canonical: str) -> None:
    assert canonical_name(wrapped) == canonical
    assert canonical_name(canonical) == canonical  # idempotent


_WRAPPER_SEGMENTS = {
    "module",
    "_orig_mod",
    "base_model",
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
    "base_layer",
    "modules_to_save",
    "original_module",
}
_segment = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in _WRAPPER_SEGMENTS)
_outer = st.sampled_from(
    ["module.", "_orig_mod.", "base_model.model.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."]
)
_inner = st.sampled_from(["_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"])


@settings(max_examples=200, deadline=None)
@given(
    base=st.lists(_segment, min_size=2, max_size=6),
    outer=st.lists(_outer, max_size=4),
    inner=st.lists(st.tuples(st.integers(0, 10), _inner), max_size=3),
    peft_wrap=st.sampled_from([None, "base_layer", "modules_to_save", "original_module"]),
    adapter=_segment,
)
def test_canonical_name_strips_any_wrapper_stack(base, outer, inner, peft_wrap, adapter) -> None:
    """Any stack of outer prefixes, inner wrapper segments and one PEFT container around a name is undone."""
    module_path, leaf = base[:-1], base[-1]
    parts = list(module_path)
    for pos, seg in inner:  # inner wrappers wrap whole modules: insert between module segments
        parts.insert(pos % (len(parts) + 1), seg)
    if peft_wrap == "modules_to_save":
        parts += ["modules_to_save", adapter]
    elif peft_wrap is not None:
        parts.append(peft_wrap)
    wrapped = "".join(outer) + ".".join([*parts, leaf])
    assert canonical_name(wrapped) == ".".join(base)


# -- ParamIndex on plain models ------------------------------------------------------------------------------


def test_param_index_plain_matches_named_parameters(model: nn.Module) -> None:
    index = ParamIndex(model)
    expected = dict(model.named_parameters())  # deduplicates tied weights, keeps the first name
    assert index.names() == list(expected)
    assert len(index) == len(expected)
    assert list(index) == list(expected)
    for name, param in expected.items():
        assert name in index
        assert index.param(name) is param
        info = index.info(name)
        assert info.name == info.full_name == name
        assert info.shape == param.shape
        # the owning module really holds the parameter under its leaf name
        assert getattr(info.module, name.rsplit(".", 1)[1]) is param
        assert index.canonical(name) == name
    assert index.shapes() == {n: tuple(p.shape) for n, p in expected.items()}
    assert [n for n, _ in index.items()] == list(expected)


@pytest.mark.parametrize(
    ("arch", "first", "alias", "overrides"),
    [
        ("gpt2", "transformer.wte.weight", "lm_head.weight", {}),
        ("llama", "model.embed_tokens.weight", "lm_head.weight", {"tie_word_embeddings": True}),
        ("qwen2", "model.embed_tokens.weight", "lm_head.weight", {"tie_word_embeddings": True}),
    ],
)
def test_tied_weights_appear_once_with_alias(arch, first, alias, overrides) -> None:
    model = make_model(arch, **overrides)
    index = ParamIndex(model)
    live = model.get_output_embeddings().weight
    assert live is model.get_input_embeddings().weight  # really tied
    assert first in index.names()
    assert alias not in index.names()
    assert alias in index
    assert index.param(alias) is index.param(first) is live
    assert index.info(alias).name == first
    assert index.info(first).aliases == (alias,)
    assert index.canonical(alias) == first
    assert sum(1 for _, p in index.items() if p is live) == 1


def test_untied_model_has_no_aliases() -> None:
    index = ParamIndex(make_model("llama"))
    assert "lm_head.weight" in index.names()
    assert index.param("lm_head.weight") is not index.param("model.embed_tokens.weight")
    assert all(index.info(n).aliases == () for n in index)


# -- ParamIndex across wrappers ------------------------------------------------------------------------------


def _output_head(arch: str) -> str:
    """Name of the output-embedding module (GPT-NeoX calls it ``embed_out`` in transformers 4.x)."""
    model = make_model(arch)
    return next(n for n, m in model.named_modules() if m is model.get_output_embeddings())


_NEOX_HEAD = _output_head("neox")
# LoRA targets, modules_to_save, and the canonical paths of the saved modules, per architecture.
_PEFT = {
    "llama": (["q_proj", "v_proj", "down_proj"], ["lm_head"], ["lm_head"]),
    "mistral": (["q_proj", "o_proj"], ["lm_head"], ["lm_head"]),
    "qwen2": (["k_proj", "up_proj"], ["lm_head"], ["lm_head"]),
    "gpt2": (["c_attn", "c_fc"], ["ln_f"], ["transformer.ln_f"]),
    "neox": (["query_key_value", "dense_4h_to_h"], [_NEOX_HEAD], [_NEOX_HEAD]),
    "bert": (["query", "value"], ["classifier"], ["classifier"]),
}


def _saved_names(index: ParamIndex, arch: str) -> set[str]:
    paths = _PEFT[arch][2]
    return {n for n in index.names() if n.rsplit(".", 1)[0] in paths}


def _to_save_module(peft_model: nn.Module, canonical_module: str) -> nn.Module:
    wrapper = unwrap_model(peft_model).get_submodule(canonical_module)
    return wrapper.modules_to_save["default"]


def _assert_same_canonical_params(
    plain: ParamIndex, wrapped: ParamIndex, skip: set[str] = frozenset()
) -> None:
    for name, param in plain.items():
        if name in skip:
            continue
        assert wrapped.param(name) is param, name
        assert wrapped.info(name).name == name


def test_param_index_through_peft(arch: str) -> None:
    model = make_model(arch)
    plain = ParamIndex(model)
    plain_params = dict(plain.items())
    targets, to_save, _ = _PEFT[arch]
    pm = lora(model, targets, to_save)
    index = ParamIndex(pm)
    names = index.names()

    lora_names = [n for n in names if ".lora_" in n]
    assert lora_names, "LoRA adapters must be indexed"
    assert all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in lora_names)
    assert [n for n in names if n not in lora_names] == plain.names()  # same names, same order
    for n in lora_names:  # adapters sit on the targeted base modules
        base = n.split(".lora_")[0] + ".weight"
        assert base in plain
        assert base.rsplit(".", 2)[-2] in targets

    saved = _saved_names(plain, arch)
    assert saved
    _assert_same_canonical_params(plain, index, skip=saved)

    # modules_to_save: the canonical name resolves to the trainable copy, not the frozen original
    for name in saved:
        module_path, leaf = name.rsplit(".", 1)
        copy = getattr(_to_save_module(pm, module_path), leaf)
        assert index.param(name) is copy
        assert copy is not plain_params[name]
        assert copy.requires_grad
        assert torch.equal(copy, plain_params[name])
        assert index.info(name).full_name.endswith(f"{module_path}.modules_to_save.default.{leaf}")

    # every name printed by the wrapped model resolves, and to the very tensor it printed
    for full, param in pm.named_parameters(remove_duplicate=False):
        canon = canonical_name(full)
        assert canon in index
        info = index.info(canon)
        assert index.canonical(full) == info.name
        assert info.name == canon or canon in info.aliases  # tied weights resolve to their first name
        if ".original_module." not in full:
            assert index.param(full) is param
    # every indexed tensor is live in the wrapped model
    live = {id(p) for p in pm.parameters()}
    assert all(id(p) in live for _, p in index.items())
    # trainable parameters are exactly the adapters and the modules_to_save copies
    assert set(index.select("*", trainable_only=True)) == set(lora_names) | saved


def test_param_index_through_compile(arch: str) -> None:
    model = make_model(arch)
    plain = ParamIndex(model)
    compiled = torch.compile(model)
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    index = ParamIndex(compiled)
    assert index.names() == plain.names()
    _assert_same_canonical_params(plain, index)
    assert index.info(plain.names()[0]).full_name == "_orig_mod." + plain.names()[0]
    for name in plain:
        assert index.info(name).aliases == plain.info(name).aliases


def test_param_index_through_ddp(arch: str, gloo_group) -> None:
    model = make_model(arch)
    plain = ParamIndex(model)
    ddp = DDP(model)
    assert all(n.startswith("module.") for n, _ in ddp.named_parameters())
    index = ParamIndex(ddp)
    assert index.names() == plain.names()
    _assert_same_canonical_params(plain, index)
    for name in plain:
        assert index.canonical("module." + index.info(name).name) == name
        assert index.info(name).aliases == plain.info(name).aliases


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_param_index_through_fsdp1(gloo_group) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = make_model("llama")
    plain = ParamIndex(model)
    fsdp = FSDP(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
    )
    assert any("._fsdp_wrapped_module." in n for n, _ in fsdp.named_parameters())
    index = ParamIndex(fsdp)
    assert index.names() == plain.names()
    _assert_same_canonical_params(plain, index)
    assert find_layers(fsdp).path == "model.layers"


def test_param_index_through_activation_checkpointing() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = make_model("llama")
    plain = ParamIndex(model)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    assert any("._checkpoint_wrapped_module." in n for n, _ in model.named_parameters())
    index = ParamIndex(model)
    assert index.names() == plain.names()
    _assert_same_canonical_params(plain, index)
    assert index.select("*", layers=[1]) == plain.select("re:^model\\.layers\\.1\\.")


def test_param_index_through_stacked_wrappers(gloo_group) -> None:
    """compile(DDP(PEFT(model))): canonical names and identities survive every layer of wrapping."""
    model = make_model("llama")
    plain = ParamIndex(model)
    pm = lora(model, ["q_proj", "up_proj"], ["lm_head"])
    stacked = torch.compile(DDP(pm))
    assert unwrap_model(stacked) is model
    index = ParamIndex(stacked)
    assert [n for n in index.names() if ".lora_" not in n] == plain.names()
    _assert_same_canonical_params(plain, index, skip={"lm_head.weight"})
    assert index.param("lm_head.weight") is _to_save_module(pm, "lm_head").weight
    full = "_orig_mod.module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert index.info("model.layers.0.self_attn.q_proj.weight").full_name == full
    assert index.canonical(full) == "model.layers.0.self_attn.q_proj.weight"
    assert index.param(full) is plain.param("model.layers.0.self_attn.q_proj.weight")


def test_unwrap_model(gloo_group) -> None:
    model = make_model("gpt2")
    assert unwrap_model(model) is model
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(DDP(model)) is model
    pm = lora(model, ["c_attn"])
    assert unwrap_model(pm) is model
    assert unwrap_model(DDP(torch.compile(pm))) is model


# -- tied weights under PEFT modules_to_save ------------------------------------------------------------------


def test_tied_lm_head_in_modules_to_save() -> None:
    """The trainable lm_head copy gets its own canonical entry; the embedding no longer lists it as an alias."""
    model = make_model("llama", tie_word_embeddings=True)
    embed = model.get_input_embeddings().weight
    pm = lora(model, ["q_proj"], ["lm_head"])
    index = ParamIndex(pm)
    copy = _to_save_module(pm, "lm_head").weight
    assert index.param("lm_head.weight") is copy
    assert index.param("model.embed_tokens.weight") is embed
    assert "lm_head.weight" in index.names()
    assert index.info("lm_head.weight").aliases == ()
    assert index.info("model.embed_tokens.weight").aliases == ()  # lm_head.weight is not this tensor any more


def test_tied_embedding_in_modules_to_save() -> None:
    """Saving the (tied) input embedding: its name resolves to the trainable copy, while ``lm_head.weight``
    still resolves to the tensor the live lm_head uses (the original embedding), not to the copy."""
    model = make_model("llama", tie_word_embeddings=True)
    original = model.get_input_embeddings().weight
    pm = lora(model, ["q_proj"], ["embed_tokens"])
    base = unwrap_model(pm)
    index = ParamIndex(pm)
    copy = _to_save_module(pm, "model.embed_tokens").weight
    assert index.param("model.embed_tokens.weight") is copy
    assert index.param("lm_head.weight") is base.lm_head.weight
    assert index.param("lm_head.weight") is original
    # each live tensor is indexed exactly once
    ids = [id(p) for _, p in index.items()]
    assert len(ids) == len(set(ids))
    assert {id(copy), id(original)} <= set(ids)


# -- masks computed on the plain model apply to wrapped models ---------------------------------------------


def _plain_mask(model: nn.Module) -> ParamMask:
    g = torch.Generator().manual_seed(0)
    return ParamMask.from_scores(
        {n: torch.rand(p.shape, generator=g) for n, p in ParamIndex(model).items()}, 0.3
    )


@pytest.mark.parametrize("wrapper", ["peft", "compile", "ddp"])
def test_plain_mask_validates_on_wrapped_model(arch: str, wrapper: str, request) -> None:
    model = make_model(arch)
    mask = _plain_mask(model)
    expected = mask.validate(model)
    assert list(expected) == mask.names() == ParamIndex(model).names()
    assert all(expected[n] is p for n, p in ParamIndex(model).items())
    assert abs(mask.density() - 0.3) < 1e-3

    skip: set[str] = set()
    if wrapper == "peft":
        targets, to_save, _ = _PEFT[arch]
        wrapped = lora(model, targets, to_save)
        skip = _saved_names(ParamIndex(model), arch)
        assert skip
    elif wrapper == "compile":
        wrapped = torch.compile(model)
    else:
        request.getfixturevalue("gloo_group")
        wrapped = DDP(model)

    resolved = mask.validate(wrapped)
    assert list(resolved) == mask.names()
    for name, param in resolved.items():
        assert mask.shape(name) == tuple(param.shape)
        if name in skip:
            module_path, leaf = name.rsplit(".", 1)
            assert param is getattr(_to_save_module(wrapped, module_path), leaf)
            assert param.requires_grad
        else:
            assert param is expected[name], name
    # the same result through a prebuilt index
    assert mask.validate(ParamIndex(wrapped)).keys() == resolved.keys()


def test_mask_keyed_by_alias_validates_to_first_name() -> None:
    model = make_model("gpt2")
    mask = ParamMask({"lm_head.weight": torch.ones(64, 32, dtype=torch.bool)})
    resolved = mask.validate(model)
    assert list(resolved) == ["transformer.wte.weight"]
    assert resolved["transformer.wte.weight"] is model.lm_head.weight


# -- errors ---------------------------------------------------------------------------------------------------


def test_unknown_name_raises_with_nearest_match() -> None:
    index = ParamIndex(make_model("llama"))
    with pytest.raises(UnknownParameterError) as e:
        index.param("model.layers.0.mlp.up_prj.weight")
    assert isinstance(e.value, KeyError)
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg
    assert "'model.layers.0.mlp.up_prj.weight'" in msg
    assert not msg.startswith('"')  # readable, not KeyError-quoted
    with pytest.raises(UnknownParameterError):
        index.info("nothing.like.this")
    with pytest.raises(UnknownParameterError):
        index.canonical("model.layers.9.mlp.up_proj.weight")
    assert "model.layers.0.mlp.up_prj.weight" not in index
    assert 3 not in index


def test_unknown_name_without_close_match_still_explains() -> None:
    index = ParamIndex(make_model("llama"))
    with pytest.raises(UnknownParameterError, match=r"parameters, e\.g\. model\.embed_tokens\.weight"):
        index.param("zzzzzzzz")


def test_mask_unknown_name_raises_with_nearest_match() -> None:
    model = make_model("qwen2")
    mask = ParamMask(
        {
            "model.layers.1.self_attn.q_proj.bais": torch.ones(32, dtype=torch.bool),
            "model.layers.1.self_attn.k_proj.weight": torch.ones(16, 32, dtype=torch.bool),
        }
    )
    with pytest.raises(UnknownParameterError, match=re.escape("model.layers.1.self_attn.q_proj.bias")):
        mask.validate(model)


def test_mask_wrong_shape_names_both_shapes() -> None:
    model = make_model("llama")
    mask = ParamMask({"model.layers.0.mlp.up_proj.weight": torch.ones(32, 64, dtype=torch.bool)})
    with pytest.raises(ValueError) as e:
        mask.validate(model)
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg
    assert "(32, 64)" in msg and "(64, 32)" in msg


def test_empty_mask_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        ParamMask().validate(make_model("llama"))


# -- select -------------------------------------------------------------------------------------------------


@pytest.fixture
def llama_index() -> ParamIndex:
    return ParamIndex(make_model("llama"))


def test_select_glob(llama_index: ParamIndex) -> None:
    got = llama_index.select("*.mlp.*")
    assert got == [n for n in llama_index.names() if ".mlp." in n]
    assert len(got) == 3 * LAYERS
    assert llama_index.select("model.layers.?.self_attn.[qk]_proj.weight") == [
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(LAYERS) for p in "qk"
    ]


def test_select_regex(llama_index: ParamIndex) -> None:
    got = llama_index.select(r"re:layers\.1\..*_proj")
    assert got == [n for n in llama_index.names() if n.startswith("model.layers.1.") and "_proj" in n]
    assert len(got) == 7
    # re: uses search semantics, globs match the whole name
    assert llama_index.select("re:norm") == [n for n in llama_index.names() if "norm" in n]
    with pytest.raises(UnknownParameterError):
        llama_index.select("norm")


def test_select_plain_name_and_union_keeps_model_order(llama_index: ParamIndex) -> None:
    names = llama_index.names()
    got = llama_index.select(["lm_head.weight", "model.embed_tokens.weight", "*.layers.0.mlp.up_proj.*"])
    assert got == [
        n
        for n in names
        if n in {"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"}
    ]
    assert llama_index.select(["*.mlp.*", "*.up_proj.*"]) == llama_index.select("*.mlp.*")  # no duplicates


def test_select_exclude(llama_index: ParamIndex) -> None:
    got = llama_index.select("*.mlp.*", exclude=["*.gate_proj.*", r"re:down"])
    assert got == [f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)]
    everything_but_norms = llama_index.select(exclude="*norm*")
    assert everything_but_norms == [n for n in llama_index.names() if "norm" not in n]
    # an exclude pattern matching nothing is harmless
    assert llama_index.select("*.mlp.*", exclude="nope") == llama_index.select("*.mlp.*")


def test_select_layers(llama_index: ParamIndex) -> None:
    names = llama_index.names()
    layer1 = [n for n in names if n.startswith("model.layers.1.")]
    assert llama_index.select(layers=[1]) == layer1
    assert llama_index.select(layers=[-1]) == layer1
    assert llama_index.select(layers=slice(1, None)) == layer1
    assert llama_index.select(layers=range(LAYERS)) == [n for n in names if n.startswith("model.layers.")]
    assert llama_index.select("*.mlp.*", layers=[0]) == [
        f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert llama_index.select("*.mlp.*", exclude="*gate*", layers=[0, 1]) == [
        f"model.layers.{i}.mlp.{p}.weight" for i in range(LAYERS) for p in ("up_proj", "down_proj")
    ]
    with pytest.raises(IndexError, match="out of range"):
        llama_index.select(layers=[LAYERS])


def test_select_layers_on_other_archs(arch: str) -> None:
    index = ParamIndex(make_model(arch))
    path = find_layers(index.model).path
    for i in range(LAYERS):
        assert index.select(layers=[i]) == [n for n in index.names() if n.startswith(f"{path}.{i}.")]
        assert index.select(layers=[i])


def test_select_layers_through_peft() -> None:
    pm = lora(make_model("llama"), ["q_proj"])
    index = ParamIndex(pm)
    got = index.select("*lora_*", layers=[1])
    assert got == [
        "model.layers.1.self_attn.q_proj.lora_A.default.weight",
        "model.layers.1.self_attn.q_proj.lora_B.default.weight",
    ]


def test_select_pattern_matching_nothing_raises(llama_index: ParamIndex) -> None:
    with pytest.raises(UnknownParameterError, match=re.escape("model.layers.0.mlp.up_proj.weight")):
        llama_index.select("model.layers.0.mlp.up_projj.weight")
    with pytest.raises(UnknownParameterError):
        llama_index.select("*.attention.*")
    with pytest.raises(UnknownParameterError):
        llama_index.select("re:^transformer\\.")
    # one dead pattern among live ones still raises
    with pytest.raises(UnknownParameterError):
        llama_index.select(["*.mlp.*", "*.c_fc.*"])


def test_select_trainable_only() -> None:
    model = make_model("llama")
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp." in n)
    index = ParamIndex(model)
    assert index.select(trainable_only=True) == index.select("*.mlp.*")
    assert index.select("re:layers\\.0\\.", trainable_only=True) == [
        f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    with pytest.raises(UnknownParameterError):
        index.select("*.self_attn.*", trainable_only=True)


def test_select_with_layers_matching_nothing_raises():
    from conftest import make_model

    from hfhooks import ParamIndex, UnknownParameterError

    index = ParamIndex(make_model("llama"))
    with pytest.raises(UnknownParameterError, match="within layers"):
        index.select("lm_head.weight", layers=[0])
