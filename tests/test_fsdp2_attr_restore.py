"""AttributionAlignment and LayerRestoration under FSDP2, in one process (a one-rank gloo group; the two-rank
runs are in tests/distributed/fsdp2_callbacks.py): sharded parameters restored, the double-backprop penalty
through ``fully_shard``-ed modules, and what is refused with which reason."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from conftest import tiny_llama
from torch.distributed.tensor import DTensor

from hfhooks import (
    AttributionAlignment,
    AttributionAlignmentCallback,
    LayerRestorationCallback,
    TaggedCollator,
    TaggedDataset,
    restore_layers,
)
from hfhooks.core.params import copy_full_


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp2_args(tmp_path, **fsdp_config):
    return T.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], fsdp="full_shard",
        fsdp_config={"version": 2, **fsdp_config},
    )  # fmt: skip


def _classifier(**overrides):
    cfg = T.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0, **overrides)  # fmt: skip
    return T.LlamaForSequenceClassification(cfg)


def _batch():
    ids = torch.randint(1, 48, (4, 10), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": torch.tensor(i % 2),
             "rationale": (torch.arange(10) < 4).float()} for i in range(4)]  # fmt: skip
    tagged = TaggedDataset(rows, tags=["rationale"])
    return TaggedCollator()([tagged[i] for i in range(4)])


def test_copy_full_writes_plain_and_sharded_parameters(gloo_group):
    plain = torch.nn.Parameter(torch.zeros(4, 3))
    with torch.no_grad():
        copy_full_(plain, torch.arange(12.0, dtype=torch.float64).view(4, 3))
    assert plain.dtype == torch.float32 and torch.equal(plain, torch.arange(12.0).view(4, 3))
    model = _shard(tiny_llama())
    p = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(p, DTensor)
    value = torch.randn(p.shape)
    with torch.no_grad():
        copy_full_(p, value)
    assert torch.equal(p.full_tensor(), value)


def test_restore_layers_on_a_fully_shard_model(gloo_group):
    reference = tiny_llama()
    model = _shard(copy.deepcopy(reference))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    report = restore_layers(model, reference, "1:2")
    for name, p in model.named_parameters():
        ref = reference.get_parameter(name)
        if name.startswith("model.layers.1."):
            assert torch.equal(p.full_tensor(), ref), name
        else:
            assert torch.equal(p.full_tensor(), ref + 1.0), name
    assert report.layers == [1] and report.restored


@pytest.mark.parametrize("method", ["grad_x_input", "attention"])
def test_alignment_gradients_through_fully_shard_match_the_plain_model(gloo_group, method):
    """The term's double backprop (grad_x_input) and its graph into the attention weights (attention) read the
    gathered parameters after FSDP2 would have resharded them; the gradients must equal the unsharded model's."""
    model = _classifier(attn_implementation="eager" if method == "attention" else "sdpa")
    ref = copy.deepcopy(model)
    _shard(model)
    for m in (model, ref):
        m.train()
        with AttributionAlignment(m, method, prior="rationale", weight=10.0, special_token_ids=[0]) as align:
            m(**_batch())["loss"].backward()
        assert align.num_hooks == 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        # summation order differs (the embedding gradient accumulates ~1e3): a tolerance relative to its scale
        scale = float(q.grad.abs().max())
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    # the modules' reshard-after-backward setting is handed back as it was
    assert all(g.reshard_after_backward for m in model.modules() for g in _groups(m))


def _groups(module):
    get = getattr(module, "_get_fsdp_state", None)
    return get()._fsdp_param_groups if get is not None else []


def test_integrated_gradients_is_refused_under_fsdp2(gloo_group):
    model = _shard(_classifier())
    with pytest.raises(RuntimeError, match="integrated_gradients.*does not support FSDP2.*grad_x_input"):
        AttributionAlignment(model, "integrated_gradients", prior="rationale").attach()


def test_alignment_callback_accepts_fsdp2(tmp_path):
    cb = AttributionAlignmentCallback("grad_x_input", prior="rationale")
    cb.on_train_begin(_fsdp2_args(tmp_path), T.TrainerState(), T.TrainerControl(), model=_classifier())
    assert cb.alignment is not None and cb.alignment.num_hooks > 0
    cb.on_train_end(_fsdp2_args(tmp_path), T.TrainerState(), T.TrainerControl())
    assert cb.alignment.num_hooks == 0


def test_restoration_callback_under_fsdp2_refuses_only_sharded_checkpoints(tmp_path):
    model, state, control = tiny_llama(), T.TrainerState(), T.TrainerControl()
    for when, mode in (("train_end", "inplace"), ("save", "inplace"), ("save", "variant")):
        cb = LayerRestorationCallback(tiny_llama(), "0:1", when=when, mode=mode)
        cb.on_train_begin(_fsdp2_args(tmp_path), state, control, model=model)
    for mode in ("inplace", "variant"):
        with pytest.raises(RuntimeError, match="SHARDED_STATE_DICT.*FULL_STATE_DICT"):
            LayerRestorationCallback(tiny_llama(), "0:1", when="save", mode=mode).on_train_begin(
                _fsdp2_args(tmp_path, state_dict_type="SHARDED_STATE_DICT"), state, control, model=model
            )


def _fsdp_checkpoint(model, ckpt):
    """A checkpoint as the Trainer writes it under FSDP2 with FULL_STATE_DICT: model.safetensors and
    accelerate's pytorch_model_fsdp.bin (a torch.save-d full state dict, tied weights sharing one storage)."""
    model.save_pretrained(ckpt)
    torch.save(model.state_dict(), ckpt / "pytorch_model_fsdp.bin")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_in_place_checkpoint_restore_under_fsdp2_rewrites_what_a_resume_loads(tmp_path, arch):
    from conftest import make_model

    reference, trained = make_model(arch), make_model(arch, seed=1)
    ckpt = tmp_path / "checkpoint-1"
    _fsdp_checkpoint(trained, ckpt)
    tied = arch == "gpt2"  # GPT-2 ties the LM head to the input embeddings: restore both, or neither
    cb = LayerRestorationCallback(reference, "0:1", when="save", embeddings=tied, lm_head=tied)
    args, state = _fsdp2_args(tmp_path), T.TrainerState()
    cb.on_train_begin(args, state, T.TrainerControl(), model=trained)
    state.global_step = 1
    cb.on_save(args, state, T.TrainerControl(), model=trained)
    resumed = torch.load(ckpt / "pytorch_model_fsdp.bin", weights_only=True)
    restored = set(cb.reports[-1].restored)
    assert restored and sorted(p.name for p in ckpt.iterdir() if "partial" in p.name) == []
    for name, value in resumed.items():
        if name in restored:
            assert torch.equal(value, reference.state_dict()[name]), name
        elif name == "lm_head.weight" and tied:  # the tied alias follows its embedding
            assert torch.equal(value, reference.state_dict()["transformer.wte.weight"]), name
        else:
            assert torch.equal(value, trained.state_dict()[name]), name


def test_in_place_checkpoint_restore_under_fsdp2_needs_the_fsdp_file(tmp_path):
    reference, trained = tiny_llama(), tiny_llama()
    ckpt = tmp_path / "checkpoint-1"
    trained.save_pretrained(ckpt)  # no pytorch_model_fsdp.bin: a resume could not load restored layers
    cb = LayerRestorationCallback(reference, "0:1", when="save")
    args, state = _fsdp2_args(tmp_path), T.TrainerState()
    cb.on_train_begin(args, state, T.TrainerControl(), model=trained)
    state.global_step = 1
    with pytest.raises(RuntimeError, match="has no pytorch_model_fsdp.bin"):
        cb.on_save(args, state, T.TrainerControl(), model=trained)
