"""Issue 11, item 16 (and 18): small silent failures — each test fails on the code before its fix.

* calibrate_logits' added LM-head bias survives save_pretrained / from_pretrained (via load_logit_bias);
* restoring a DoRA model refuses before modifying anything;
* dedicated (routing) masks are saved as "1=dedicated" and a "1=trainable" mask is refused where a dedicated
  one is needed;
* LayerRestorationCallback restores a checkpoint before the Trainer pushes it, refuses push setups it cannot
  serve, and edits on ``args.should_save``;
* FSDP1 started by ``accelerate launch`` is detected; LOMO-style optimizers are refused;
* unlearning with label smoothing or ``compute_loss_func`` fails with the exact reason, before any step;
* integrated gradients converge at the default step count and warn on a large completeness gap.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from conftest import lora, tiny_bert, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file

from hfhooks import (
    GradientRoutingCallback,
    LayerRestorationCallback,
    ParamMask,
    Router,
    SaliencyUnlearningCallback,
    TaggedCollator,
    ablate,
    attribute,
    calibrate_logits,
    dedicated_mask,
    forget_retain_dataset,
    load_logit_bias,
    restore_layers,
)
from hfhooks.trainer.guards import fsdp_version, refuse_step_in_backward, refuse_unsupported


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


class LMData(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8, seed=0):
        self.ids = torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, **overrides) -> T.TrainingArguments:
    args = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    args.update(overrides)
    return T.TrainingArguments(**args)


# -- (a) calibrate_logits survives save / load --------------------------------------------------------------
def test_calibrated_bias_survives_save_and_load(tmp_path):
    model = tiny_llama()
    ids = LMData(n=8).ids
    batches = [{"input_ids": ids[:4], "labels": ids[:4]}]
    with pytest.warns(UserWarning, match="load_logit_bias"):
        calibrate_logits(model, {"forget": (batches, 1.0)}, steps=20, lr=0.1, progress=False)
    assert model.lm_head.bias.abs().max() > 0  # the calibration did something worth keeping
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "cal")
    reloaded = T.LlamaForCausalLM.from_pretrained(tmp_path / "cal").eval()
    with torch.no_grad():  # the architecture has no LM-head bias: from_pretrained drops it
        assert not torch.allclose(reloaded(input_ids=ids).logits, expected)
    load_logit_bias(reloaded, tmp_path / "cal")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    load_logit_bias(reloaded, tmp_path / "cal")  # idempotent: the same bias is accepted
    plain = tiny_llama()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(KeyError, match="lm_head.bias"):
        load_logit_bias(T.LlamaForCausalLM.from_pretrained(tmp_path / "plain"), tmp_path / "plain")


def test_calibrate_keeps_quiet_when_the_bias_persists():
    model = tiny_bert()  # the classifier head is an nn.Linear with a bias: nothing is added, nothing to warn
    model.get_output_embeddings = lambda: model.classifier
    batches = [{"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1])}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate_logits(model, {"x": (batches, 1.0)}, steps=2, progress=False)


# -- (b) DoRA: refuse before modifying ---------------------------------------------------------------------
def test_dora_restore_refuses_before_modifying():
    reference = tiny_llama()
    torch.manual_seed(1)
    model = lora(tiny_llama(), ["q_proj", "v_proj"], use_dora=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = _snapshot(model)
    with pytest.raises(NotImplementedError, match="DoRA"):
        restore_layers(model, reference, "0:2")
    assert _unchanged(model, before)
    report = restore_layers(model, reference, "0:2", adapters="drop")  # the way that works
    assert set(report.adapters.values()) == {"dropped"}


# -- (c) dedicated mask semantics ------------------------------------------------------------------------------
def test_dedicated_mask_saved_as_dedicated_and_trainable_mask_refused(tmp_path):
    model = tiny_llama()
    dedicated = dedicated_mask(model, mlp_units=8, heads=1)
    dedicated.save(tmp_path / "dedicated.safetensors", model=model)
    with safe_open(str(tmp_path / "dedicated.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["hfhooks.semantics"]) == "1=dedicated"
    loaded = ParamMask.load(tmp_path / "dedicated.safetensors")
    assert loaded.metadata["semantics"] == "1=dedicated" and loaded == dedicated
    assert "semantics" not in (~dedicated).metadata  # the complement does not mean "dedicated"

    # a "1=trainable" mask (SalUn / GradientMask) over the same coordinates: the opposite meaning
    trainable = ParamMask({n: dedicated[n] for n in dedicated.names()})
    trainable.save(tmp_path / "trainable.safetensors")
    trainable = ParamMask.load(tmp_path / "trainable.safetensors")
    assert trainable.metadata["semantics"] == "1=trainable"
    before = _snapshot(model)
    with pytest.raises(ValueError, match="1=trainable"):
        ablate(model, trainable)
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match="dedicated mask"):
        Router(model, trainable)
    with pytest.raises(ValueError, match="dedicated mask"):
        GradientRoutingCallback(tmp_path / "trainable.safetensors")
    assert ablate(model, loaded) == sum(int(dedicated[n].sum()) for n in dedicated.names())


def test_routing_callback_saves_a_hand_built_mask_as_dedicated(tmp_path):
    model = tiny_llama()
    built = dedicated_mask(model, mlp_units=4, heads=1)
    hand = built & built  # the same row/column slices, no metadata: as a mask combined by hand
    assert "semantics" not in hand.metadata
    cb = GradientRoutingCallback(hand, save_mask=tmp_path / "d.safetensors")
    cb.on_train_begin(
        _args(tmp_path),
        T.TrainerState(),
        T.TrainerControl(),
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
    )
    try:
        assert ParamMask.load(tmp_path / "d.safetensors").metadata["semantics"] == "1=dedicated"
    finally:
        cb.router.detach()


HAS_PUSH_EVENT = hasattr(T.TrainerCallback, "on_push_begin")


# -- (d) LayerRestorationCallback and the Hub ---------------------------------------------------------------
class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the weights each upload would send, at upload time."""

    def __init__(self):
        self.uploads: list[tuple[str, dict[str, torch.Tensor]]] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=f"me/{Path(repo_id).name}")

    def upload_folder(self, *, folder_path, run_as_future=False, path_in_repo=None, **kwargs):
        weights = Path(folder_path) / "model.safetensors"
        self.uploads.append((path_in_repo or ".", load_file(weights) if weights.exists() else {}))
        if run_as_future:
            done = concurrent.futures.Future()
            done.set_result(None)
            return done
        return None


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    if hasattr(T.trainer, "hf_api"):  # transformers 5
        monkeypatch.setattr(T.trainer, "hf_api", lambda: fake)
    else:  # transformers 4.x calls the module-level huggingface_hub functions it imported
        monkeypatch.setattr(T.trainer, "create_repo", fake.create_repo)
        monkeypatch.setattr(T.trainer, "upload_folder", fake.upload_folder)
    return fake


@pytest.mark.skipif(
    not HAS_PUSH_EVENT, reason="no on_push_begin event: such pushes are refused (tested below)"
)
def test_restoration_runs_before_the_trainer_pushes_a_checkpoint(tmp_path, hub):
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    cb = LayerRestorationCallback(reference, [0], when=("save", "train_end"))
    args = _args(tmp_path, save_strategy="steps", save_steps=2, push_to_hub=True, hub_strategy="checkpoint")
    trainer = T.Trainer(model=model, args=args, train_dataset=LMData(), callbacks=[cb])
    trainer.train()
    layer0 = "model.layers.0.mlp.up_proj.weight"
    pushed = [w for where, w in hub.uploads if layer0 in w]
    assert len(pushed) == 2  # the model files and the checkpoint folder of checkpoint-2
    for weights in pushed:
        assert torch.equal(weights[layer0], reference.state_dict()[layer0])  # restored, not trained
        assert not torch.equal(weights["model.layers.1.mlp.up_proj.weight"], reference.state_dict()[
            "model.layers.1.mlp.up_proj.weight"])  # fmt: skip
    assert len(cb.reports) == 2  # the checkpoint once (at push), the live model at train end
    trainer.create_model_card = lambda **kw: None
    trainer.push_to_hub()  # the live model: restored at train end
    assert torch.equal(hub.uploads[-1][1][layer0], reference.state_dict()[layer0])
    assert len(cb.reports) == 2


@pytest.mark.parametrize(
    "kwargs, strategy",
    [
        (dict(when=("save", "train_end"), mode="variant"), "every_save"),
        (dict(when="save"), "every_save"),  # trainer.push_to_hub() would send the live, unrestored model
        (dict(when="train_end"), "every_save"),  # the checkpoints pushed during training are not restored
        (dict(when="save"), "end"),
    ],
)
def test_restoration_refuses_pushes_it_cannot_restore(tmp_path, hub, kwargs, strategy):
    model = tiny_llama()
    cb = LayerRestorationCallback(copy.deepcopy(model), [0], **kwargs)
    args = _args(tmp_path, push_to_hub=True, hub_strategy=strategy)
    trainer = T.Trainer(model=model, args=args, train_dataset=LMData(), callbacks=[cb])
    before = _snapshot(model)
    # without the on_push_begin event (transformers 4.x) every strategy but "end" is refused for that reason
    why = "unrestored weights" if HAS_PUSH_EVENT or strategy == "end" else "no on_push_begin event"
    with pytest.raises(ValueError, match=why):
        trainer.train()
    assert _unchanged(model, before)


def test_restoration_at_save_follows_should_save(tmp_path):
    reference = tiny_llama()
    trained = tiny_llama(initializer_range=0.5)
    ckpt = tmp_path / "checkpoint-3"
    trained.save_pretrained(ckpt)
    cb = LayerRestorationCallback(reference, [0], when="save")
    layer0 = "model.layers.0.mlp.up_proj.weight"
    # world process zero of a run whose saves happen elsewhere (should_save False): nothing to edit here
    cb.on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=False), SimpleNamespace(
        global_step=3, is_world_process_zero=True), None)  # fmt: skip
    assert torch.equal(load_file(ckpt / "model.safetensors")[layer0], trained.state_dict()[layer0])
    # a node's local main process with save_on_each_node (should_save True, not world process zero): edits
    cb.on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=True), SimpleNamespace(
        global_step=3, is_world_process_zero=False), None)  # fmt: skip
    assert torch.equal(load_file(ckpt / "model.safetensors")[layer0], reference.state_dict()[layer0])


# -- (e) FSDP1 from accelerate launch, (f) LOMO ----------------------------------------------------------------
@pytest.mark.parametrize(
    "env, expected",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, 1),  # accelerate 1.0: no FSDP_VERSION, always FSDP1
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, 1),  # accelerate ≥ 1.6
        ({"ACCELERATE_USE_FSDP": "True", "FSDP_VERSION": "2"}, 2),
        ({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "1"}, None),
    ],
)
def test_fsdp_from_accelerate_launch_is_detected(monkeypatch, tmp_path, env, expected):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = SimpleNamespace(fsdp="", fsdp_config={}, deepspeed=None)  # what TrainingArguments() holds then
    assert fsdp_version(args) == expected
    if expected == 1:
        with pytest.raises(RuntimeError, match="FSDP1"):
            refuse_unsupported(args, "GradientMaskCallback", fsdp2=True)


def test_fsdp1_wrapped_model_is_detected():
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Wrapped(
        FullyShardedDataParallel
    ):  # an FSDP1 wrapper as isinstance sees it (FSDP1 needs an accelerator)
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.inner = module

    wrapped = torch.nn.Sequential(Wrapped(torch.nn.Linear(4, 4)))
    with pytest.raises(RuntimeError, match="FSDP1"):
        refuse_unsupported(SimpleNamespace(fsdp="", deepspeed=None), "GradientMaskCallback", model=wrapped)


@pytest.mark.parametrize("optim", ["lomo", "adalomo", "galore_adamw_layerwise"])
def test_step_in_backward_optimizers_are_refused(optim):
    args = SimpleNamespace(optim=T.training_args.OptimizerNames(optim))
    with pytest.raises(RuntimeError, match=f"optim='{optim}'.*inside backward"):
        refuse_step_in_backward(args, "GradientMaskCallback")
    refuse_step_in_backward(SimpleNamespace(optim=T.training_args.OptimizerNames("adamw_torch")), "x")


@pytest.mark.parametrize("make", ["mask", "routing", "unlearning"])
def test_callbacks_refuse_lomo(tmp_path, make):
    from hfhooks import GradientMaskCallback

    model = tiny_llama()
    args = _args(tmp_path, optim="lomo")
    state, control = T.TrainerState(), T.TrainerControl()
    if make == "mask":
        cb = GradientMaskCallback(ParamMask({n: torch.ones_like(p, dtype=torch.bool)
                                             for n, p in model.named_parameters()}))  # fmt: skip
    elif make == "routing":
        cb = GradientRoutingCallback(mlp_units=4, heads=0)
    else:
        cb = SaliencyUnlearningCallback(LMData(n=4), objective="ga")
    with pytest.raises(RuntimeError, match="inside backward"):
        cb.on_train_begin(args, state, control, model=model, optimizer=torch.optim.SGD(model.parameters()))


# -- (g) unlearning with label smoothing / compute_loss_func ---------------------------------------------------
def _unlearn_trainer(tmp_path, **kwargs):
    model = tiny_llama()
    forget, retain = LMData(n=8, seed=1), LMData(n=8, seed=2)
    cb = SaliencyUnlearningCallback(forget, objective="graddiff", progress=False)
    data = forget_retain_dataset(forget, retain)
    args = _args(tmp_path, remove_unused_columns=False, **kwargs.pop("args", {}))
    trainer = T.Trainer(
        model=model, args=args, train_dataset=data, data_collator=TaggedCollator(), callbacks=[cb], **kwargs
    )
    return model, trainer


def test_unlearning_with_label_smoothing_is_refused_with_the_reason(tmp_path):
    model, trainer = _unlearn_trainer(tmp_path, args={"label_smoothing_factor": 0.1})
    before = _snapshot(model)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1.*removes `labels`"):
        trainer.train()
    assert _unchanged(model, before)


def test_unlearning_with_compute_loss_func_is_refused_with_the_reason(tmp_path):
    def loss_func(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(
            outputs["logits"][:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        )

    model, trainer = _unlearn_trainer(tmp_path, compute_loss_func=loss_func)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="compute_loss_func.*replace the forget/retain objective"):
        trainer.train()
    assert _unchanged(model, before)


# -- item 18: integrated gradients ---------------------------------------------------------------------------
def _nonlinear_bert():
    """A tiny BERT whose large weights make the score far from linear along the IG path (like a trained one)."""
    torch.manual_seed(3)
    return tiny_bert(initializer_range=0.3).eval()


def _ig_batch():
    ids = torch.randint(5, 64, (6, 10), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(6) % 2}


def _delta(model, batch, classes):
    """s(x) − s(0) at the embedding output, computed independently of hfhooks."""
    e = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        f = lambda x: model(inputs_embeds=x, attention_mask=batch["attention_mask"]).logits  # noqa: E731
        return (f(e) - f(torch.zeros_like(e))).gather(1, classes[:, None]).squeeze(1)


def test_integrated_gradients_default_converges_and_large_gaps_warn():
    from hfhooks.attribution.methods import completeness_gap

    model, batch = _nonlinear_bert(), _ig_batch()
    reference = attribute(model, batch, "integrated_gradients", steps=256, completeness_tol=None)
    delta = _delta(model, batch, batch["labels"])
    assert completeness_gap(reference, delta).max() < 1e-3  # the reference really is converged
    coarse = attribute(model, batch, "integrated_gradients", steps=2, completeness_tol=None)
    assert completeness_gap(coarse, delta).max() > 0.1  # the model is nonlinear enough to tell
    with pytest.warns(UserWarning, match="steps=2 is far from converged"):
        attribute(model, batch, "integrated_gradients", steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = attribute(model, batch, "integrated_gradients")  # no steps given: converged, no warning
    cos = torch.nn.functional.cosine_similarity(default.flatten(1), reference.flatten(1), dim=1)
    assert cos.min() > 0.999
    assert completeness_gap(default, delta).max() < 0.05


def test_integrated_gradients_pred_target_keeps_one_class_along_the_path():
    from hfhooks.attribution.methods import completeness_gap

    model, batch = _nonlinear_bert(), _ig_batch()
    with torch.no_grad():
        pred = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
        at_zero = model(
            inputs_embeds=torch.zeros(*batch["input_ids"].shape, 32), attention_mask=batch["attention_mask"]
        ).logits.argmax(-1)
    assert (pred != at_zero).any()  # some examples switch class along the path
    attr = attribute(model, batch, "integrated_gradients", target="pred", steps=256, completeness_tol=None)
    assert completeness_gap(attr, _delta(model, batch, pred)).max() < 1e-3
