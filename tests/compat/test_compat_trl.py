"""The TRL column of the compatibility matrix: every callback inside TRL's ``SFTTrainer`` (and ``DPOTrainer``
where the method makes sense) on a ``datasets.Dataset`` with side-label columns, TRL's tokenisation, its
collator and its fused LM head (``model(..., fused_lm_head=True)`` returns label log-probabilities, no logits).

Side labels reach the hooks through ``TaggedCollator(<TRL's collator>, columns=[...])`` with
``remove_unused_columns=False``. Refusals are checked by message and raised before any optimizer step (the
weights are compared bit for bit with the ones before ``train()``).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from compat_utils import (
    VOCAB,
    HookProbe,
    hfhooks_hooks,
    hooks_report,
    llama,
    moved,
    random_mask,
    refused,
    snapshot,
)

from hfhooks import (
    AttributionAlignmentCallback,
    GradientMaskCallback,
    GradientRoutingCallback,
    LayerRestorationCallback,
    ParamMask,
    SaliencyUnlearningCallback,
    TaggedCollator,
    UnlearningObjective,
    dedicated_mask,
)
from hfhooks.core.params import ParamIndex

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 3)]  # the tiny models' vocabulary


def tokenizer():
    """A word-level fast tokenizer over ``w0 … w44`` (built offline: no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def _words(g: torch.Generator, n: int) -> str:
    return " ".join(f"w{int(t)}" for t in torch.randint(0, VOCAB - 3, (n,), generator=g))


def text_dataset(n: int = 16, seed: int = 0, **columns):
    """``{"text": ...}`` rows of 6–9 words plus side-label columns (``name=[per-example values]``)."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"text": _words(g, 6 + i % 4), **{k: v[i] for k, v in columns.items()}} for i in range(n)]
    return datasets.Dataset.from_list(rows)


def sft_config(out, **overrides) -> SFTConfig:
    kw = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
              report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, max_length=16, seed=0,
              dataloader_num_workers=0)  # fmt: skip
    kw.update(overrides)
    return SFTConfig(**kw)


def tag_collator(*columns: str, **kw) -> TaggedCollator:
    return TaggedCollator(DataCollatorForLanguageModeling(pad_token_id=0), columns=columns, **kw)


class Recorder:
    """Wraps a collator and keeps every batch it produced (to recompute the first step's loss)."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        self.batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batch


def forget_rows(trainer):
    """The trainer's TRL-tokenised forget rows (``unlearn == 1``, dataset order), as model inputs only."""
    rows = trainer.train_dataset.filter(lambda e: e["unlearn"] == 1)
    return rows.select_columns(["input_ids", "labels"])


def sft(model, args, dataset, callback=None, collator=None) -> SFTTrainer:
    """An ``SFTTrainer`` with a :class:`HookProbe` first (``trainer.probe``: the hook census at train start)."""
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer(),
                         data_collator=collator, callbacks=[HookProbe()])  # fmt: skip
    trainer.probe = next(c for c in trainer.callback_handler.callbacks if isinstance(c, HookProbe))
    if callback is not None:
        trainer.add_callback(callback)
    return trainer


def run(trainer) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


def assert_no_hooks(trainer) -> None:
    """No hfhooks hook left, and the hook census equal to the one at train start."""
    if hasattr(trainer, "probe"):
        report = hooks_report(trainer.probe, trainer.model)
        assert report == {"hfhooks_hooks_left": [], "census_changed": {}}, report
    assert hfhooks_hooks(trainer.model, trainer.optimizer) == []


def frozen_and_trained(before, model, may) -> tuple[int, int]:
    frozen = trained = 0
    for n, p in ParamIndex(model).items():
        allowed = may.get(n, torch.zeros(p.shape, dtype=torch.bool)).expand(p.shape)
        frozen += moved(before[n], p, ~allowed)
        trained += moved(before[n], p, allowed)
    return frozen, trained


def assert_mask_held(before, trainer, mask) -> None:
    """Coordinates outside ``mask`` did not move, some inside it trained, and no hfhooks hook is left."""
    may = {n: mask[n].bool() if n in mask else torch.zeros((), dtype=torch.bool) for n in before}
    frozen, trained = frozen_and_trained(before, trainer.model, may)
    assert frozen == 0 and trained > 0
    assert_no_hooks(trainer)


# -- ✓ cells -----------------------------------------------------------------------------------------------
@pytest.mark.compat(callback="gradient_mask", setup="trl")
def test_gradient_mask_sft(tmp_path):
    model = llama()
    mask = random_mask(model)
    trainer = sft(model, sft_config(tmp_path), text_dataset(), GradientMaskCallback(mask))
    before = snapshot(trainer.model)
    run(trainer)
    assert_mask_held(before, trainer, mask)


@pytest.mark.compat(callback="gradient_mask", setup="trl", variant="DPOTrainer")
def test_gradient_mask_dpo(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [
        {"prompt": _words(g, 4), "chosen": " " + _words(g, 3), "rejected": " " + _words(g, 3)}
        for _ in range(8)
    ]
    model = llama()
    mask = random_mask(model)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer(),
                         callbacks=[GradientMaskCallback(mask)])  # fmt: skip
    before = snapshot(trainer.model)
    run(trainer)
    assert_mask_held(before, trainer, mask)


@pytest.mark.compat(callback="routing", setup="trl")
def test_routing_sft(tmp_path):
    """Forget-only steps move only dedicated coordinates, retain-only steps only shared ones: the labels came
    from the dataset's ``routing`` column through TRL's collator."""
    model = llama()
    ded = dedicated_mask(model, mlp_units=8, heads=1)
    for phase, label in (("forget", 1), ("retain", 0)):
        cb = GradientRoutingCallback(ded, strict=True)
        data = text_dataset(8, seed=label, routing=[label] * 8)
        args = sft_config(tmp_path / phase, max_steps=2, remove_unused_columns=False)
        trainer = sft(model, args, data, cb, tag_collator("routing", homogeneous="routing"))
        before = snapshot(trainer.model)
        run(trainer)
        may = {}
        for n, p in ParamIndex(trainer.model).items():
            d = ded[n].bool().expand(p.shape) if n in ded else torch.zeros(p.shape, dtype=torch.bool)
            may[n] = d if label == 1 else ~d
        frozen, trained = frozen_and_trained(before, trainer.model, may)
        assert frozen == 0 and trained > 0, (phase, frozen, trained)
        assert cb.router.counts[phase] > 0
        assert_no_hooks(trainer)


@pytest.mark.parametrize(
    "objective",
    [
        pytest.param("graddiff", marks=pytest.mark.compat(callback="unlearning", setup="trl")),
        pytest.param(
            "npo", marks=pytest.mark.compat(callback="unlearning", setup="trl", variant="objective='npo'")
        ),
    ],
)
def test_unlearning_sft(tmp_path, objective):
    """The mask is computed on the forget rows, masked-out coordinates stay bit-identical, and the loss TRL logs
    for the first step is the forget/retain objective (recomputed from the logits of the initial model) — not
    TRL's NLL, which its fused LM head would otherwise compute."""
    forget_flags = [i % 2 for i in range(16)]
    data = text_dataset(16, unlearn=forget_flags, example_id=[i // 2 for i in range(16)])
    model = llama()
    model0 = copy.deepcopy(model)
    rec = Recorder(tag_collator("unlearn", "example_id"))
    trainer = sft(model, sft_config(tmp_path, max_steps=2, remove_unused_columns=False), data, None, rec)
    collate = DataCollatorForLanguageModeling(pad_token_id=0)
    cb = SaliencyUnlearningCallback(forget_rows(trainer), objective=objective, ratio=0.5, collate=collate,
                                    progress=False)  # fmt: skip
    trainer.add_callback(cb)
    before = snapshot(trainer.model)
    run(trainer)
    assert cb.mask is not None
    assert_mask_held(before, trainer, cb.mask)
    # the first step's loss, recomputed: the objective on the initial model's logits
    batch = dict(rec.batches[0])
    flags, ids, labels = batch.pop("unlearn"), batch.pop("example_id"), batch.pop("labels")
    assert 0 < int(flags.sum()) < len(flags), "the first batch should mix forget and retain rows"
    ref = UnlearningObjective(objective, reference=cb.objective.reference)
    with torch.no_grad():
        expected = ref(model0(**batch).logits, labels, flags, ids, causal=True)
        nll = torch.nn.functional.cross_entropy(model0(**batch).logits[:, :-1].flatten(0, 1),
                                                labels[:, 1:].flatten(), ignore_index=-100)  # fmt: skip
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert abs(logged - float(nll)) > 1e-3, "the logged loss is TRL's own NLL: the objective did not act"


@pytest.mark.compat(callback="restoration", setup="trl")
def test_restoration_sft(tmp_path):
    model = llama()
    reference = {n: p.detach().clone() for n, p in model.state_dict().items()}
    cb = LayerRestorationCallback(reference, "0:1", when=("train_end",))
    trainer = sft(model, sft_config(tmp_path), text_dataset(), cb)
    before = snapshot(trainer.model)
    run(trainer)
    layer0 = re.compile(r"^model\.layers\.0\.")
    index = ParamIndex(trainer.model)
    assert sum(moved(reference[n], p) for n, p in index.items() if layer0.match(n)) == 0
    assert sum(moved(before[n], p) for n, p in index.items() if n.startswith("model.layers.1.")) > 0
    assert len(cb.reports) >= 1
    assert_no_hooks(trainer)


# -- ✗ cells and refusals ----------------------------------------------------------------------------------
def refused_before_any_step(request, trainer, exc, match) -> None:
    """``trainer.train()`` raises ``exc`` matching ``match`` and no weight changed (no optimizer step ran)."""
    before = snapshot(trainer.model)
    with refused(request, exc, match):
        run(trainer)
    assert all(moved(before[n], p) == 0 for n, p in ParamIndex(trainer.model).items())
    assert trainer.state.global_step == 0


@pytest.mark.compat(callback="attribution", setup="trl", expect="error")
def test_attribution_sft_refused(tmp_path, request):
    data = text_dataset(8, rationale=[[1.0] * 10] * 8)
    cb = AttributionAlignmentCallback("grad_x_input", prior="rationale")
    trainer = sft(llama(), sft_config(tmp_path, remove_unused_columns=False), data, cb,
                  tag_collator("rationale"))  # fmt: skip
    refused_before_any_step(request, trainer, ValueError, "fused LM head")


@pytest.mark.compat(callback="unlearning", setup="trl", variant="packing=True", expect="error")
def test_unlearning_packing_refused(tmp_path, request):
    data = text_dataset(16, unlearn=[i % 2 for i in range(16)])
    # "wrapped" packing keeps a custom collator ("bfd" implies padding_free, for which TRL refuses one)
    args = sft_config(tmp_path, packing=True, packing_strategy="wrapped", remove_unused_columns=False)
    cb = SaliencyUnlearningCallback(data, objective="ga", progress=False)
    trainer = sft(llama(), args, data, cb, tag_collator("unlearn"))
    refused_before_any_step(request, trainer, ValueError, r"packing=True .*SFTConfig\(packing=False")


@pytest.mark.compat(callback="routing", setup="trl", variant="padding_free=True", expect="error")
def test_routing_padding_free_refused(tmp_path, request):
    data = text_dataset(8, routing=[1] * 8)
    # TRL refuses custom collators with padding_free: the labels could only be lost, which is refused too
    args = sft_config(tmp_path, padding_free=True, max_length=None, remove_unused_columns=False)
    trainer = sft(llama(), args, data, GradientRoutingCallback(mlp_units=8))
    refused_before_any_step(request, trainer, ValueError, r"SFTConfig\(padding_free=False\)")


@pytest.mark.compat(callback="unlearning", setup="trl", variant="loss_type='dft'", expect="error")
def test_unlearning_dft_refused(tmp_path, request):
    data = text_dataset(8, unlearn=[i % 2 for i in range(8)])
    args = sft_config(tmp_path, loss_type="dft", remove_unused_columns=False)
    trainer = sft(llama(), args, data, SaliencyUnlearningCallback(data, objective="ga", progress=False),
                  tag_collator("unlearn"))  # fmt: skip
    refused_before_any_step(request, trainer, ValueError, r"SFTConfig\(loss_type='nll'\)")


@pytest.mark.compat(callback="routing", setup="trl", variant="DPOTrainer", expect="error")
def test_routing_dpo_refused(tmp_path, request):
    g = torch.Generator().manual_seed(0)
    rows = [
        {"prompt": _words(g, 4), "chosen": " " + _words(g, 3), "rejected": " " + _words(g, 3)}
        for _ in range(4)
    ]
    model = llama()
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no")  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer(),
                         callbacks=[GradientRoutingCallback(mlp_units=8)])  # fmt: skip
    refused_before_any_step(request, trainer, ValueError, "preference pairs")


def test_routing_without_the_column_refused_before_a_step(tmp_path):
    """TRL's own collator (no TaggedCollator): the routing labels never arrive; refused before the first
    optimizer step, naming the TRL recipe."""
    trainer = sft(
        llama(), sft_config(tmp_path), text_dataset(8, routing=[1] * 8), GradientRoutingCallback(mlp_units=8)
    )
    before = snapshot(trainer.model)
    with pytest.raises(RuntimeError, match=r"No routing labels.*columns=\['routing'\]"):
        run(trainer)
    assert all(moved(before[n], p) == 0 for n, p in ParamIndex(trainer.model).items())


def test_unlearning_without_the_column_refused_before_a_step(tmp_path):
    """TRL's own collator drops the ``unlearn`` column: the objective names the TRL recipe at the first
    forward, before any optimizer step (formerly a bare ``KeyError: 'logits'`` on TRL's fused output)."""
    data = text_dataset(8, unlearn=[i % 2 for i in range(8)])
    trainer = sft(llama(), sft_config(tmp_path), data)
    collate = DataCollatorForLanguageModeling(pad_token_id=0)
    forget = forget_rows(sft(llama(), sft_config(tmp_path, remove_unused_columns=False), data))
    trainer.add_callback(SaliencyUnlearningCallback(forget, objective="ga", progress=False, collate=collate))
    before = snapshot(trainer.model)
    with pytest.raises(RuntimeError, match=r"No 'unlearn' tags.*columns=\['unlearn'\]"):
        run(trainer)
    assert all(moved(before[n], p) == 0 for n, p in ParamIndex(trainer.model).items())


def test_tag_column_dropped_by_remove_unused_columns(tmp_path):
    """``remove_unused_columns=True`` (the default) drops the column before the collator: the collator names
    the option."""
    data = text_dataset(8, routing=[1] * 8)
    trainer = sft(
        llama(), sft_config(tmp_path), data, GradientRoutingCallback(mlp_units=8), tag_collator("routing")
    )
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        run(trainer)
    assert trainer.state.global_step == 0


# -- PEFT inside SFTTrainer: TRL wraps the model in a PeftModel *after* the callbacks were built ---------------
def lora_config(**kw):
    import peft

    return peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM", **kw)  # fmt: skip


def sft_peft(model, args, dataset, callback=None, collator=None, **lora) -> SFTTrainer:
    """:func:`sft` with ``peft_config=LoraConfig(r=2, q_proj/v_proj, **lora)``: TRL builds the PeftModel."""
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer(),
                         data_collator=collator, callbacks=[HookProbe()], peft_config=lora_config(**lora))  # fmt: skip
    assert type(trainer.model).__name__.startswith("PeftModel")
    trainer.probe = next(c for c in trainer.callback_handler.callbacks if isinstance(c, HookProbe))
    if callback is not None:
        trainer.add_callback(callback)
    return trainer


def effective_deltas(model) -> dict[str, torch.Tensor]:
    """``{canonical base weight name: s·B·A}`` summed over the adapters of every LoRA layer of ``model``."""
    from hfhooks.core.params import canonical_name
    from hfhooks.masks.lora import lora_layers

    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in lora_layers(model).values():
        delta = sum(layer.lora_B[a].weight @ layer.lora_A[a].weight * layer.scaling[a] for a in layer.lora_A)
        out[canonical_name(f"{names[id(layer)]}.weight")] = delta.detach().clone()
    return out


@pytest.mark.compat(callback="gradient_mask", setup="trl", variant="peft_config=LoraConfig")
def test_gradient_mask_sft_peft_mask_on_the_adapters(tmp_path):
    """The recipe: build the mask on ``trainer.model`` (the PeftModel TRL made), then add the callback."""
    trainer = sft_peft(llama(), sft_config(tmp_path), text_dataset())
    mask = random_mask(trainer.model)
    assert mask.names() and all(".lora_" in n for n in mask.names())
    trainer.add_callback(GradientMaskCallback(mask))
    before = snapshot(trainer.model)
    run(trainer)
    assert_mask_held(before, trainer, mask)


@pytest.mark.compat(
    callback="gradient_mask", setup="trl", variant="peft_config=LoraConfig, neuron mask on base"
)
def test_gradient_mask_sft_peft_neuron_mask_on_base_names(tmp_path):
    """A row mask built on the *base* model before TRL wrapped it maps onto ``lora_B`` rows: the frozen output
    units of the effective weight ``W + s·B·A`` stay exactly as they were, the kept ones train."""
    model = llama()
    keep = {
        "model.layers.0.self_attn.q_proj.weight": [0, 1, 2, 3],
        "model.layers.1.self_attn.v_proj.weight": [1, 5],
    }
    mask = ParamMask.from_slices({n: (0, rows) for n, rows in keep.items()}, model)
    trainer = sft_peft(model, sft_config(tmp_path), text_dataset(), GradientMaskCallback(mask))
    run(trainer)
    deltas = effective_deltas(trainer.model)
    for name, delta in deltas.items():
        rows = torch.zeros(delta.shape[0], dtype=torch.bool)
        rows[keep.get(name, [])] = True
        assert int(delta[~rows].ne(0).sum()) == 0, name  # frozen units of W + s·B·A did not move
        assert name not in keep or int(delta[rows].ne(0).sum()) > 0, name  # kept units trained
    assert_no_hooks(trainer)


@pytest.mark.compat(callback="gradient_mask", setup="trl", variant="peft_config=LoraConfig, element mask on base",
                    expect="error")  # fmt: skip
def test_gradient_mask_sft_peft_element_mask_on_base_refused(tmp_path, request):
    model = llama()
    trainer = sft_peft(model, sft_config(tmp_path), text_dataset(), GradientMaskCallback(random_mask(model)))
    refused_before_any_step(request, trainer, ValueError, r"element mask on .*q_proj.*row/column")
    assert_no_hooks(trainer)


@pytest.mark.compat(callback="gradient_mask", setup="trl", variant="peft_config=LoraConfig, mask on unadapted base",
                    expect="error")  # fmt: skip
def test_gradient_mask_sft_peft_mask_on_unadapted_base_refused(tmp_path, request):
    """A mask on base weights no adapter wraps (the MLP; LoRA targets q/v) can never act once TRL wrapped the
    model: refused before a step, naming the recipe (formerly only "The mask is empty")."""
    model = llama()
    mask = ParamMask.from_slices({"model.layers.0.mlp.up_proj.weight": (0, [0, 1, 2])}, model)
    trainer = sft_peft(model, sft_config(tmp_path), text_dataset(), GradientMaskCallback(mask))
    refused_before_any_step(
        request, trainer, ValueError, r"up_proj.*Build the mask on the PeftModel.*trainer\.model"
    )
    assert_no_hooks(trainer)


@pytest.mark.compat(callback="unlearning", setup="trl", variant="peft_config=LoraConfig")
def test_unlearning_sft_peft_scores_on_the_adapter(tmp_path):
    """SalUn on the PeftModel TRL made: the mask is over LoRA units (``lora_B`` rows of the adapted weights);
    masked-out coordinates stay bit-identical, the others train, and the base weights never move."""
    data = text_dataset(16, unlearn=[i % 2 for i in range(16)], example_id=[i // 2 for i in range(16)])
    args = sft_config(tmp_path, max_steps=2, remove_unused_columns=False)
    trainer = sft_peft(llama(), args, data, None, tag_collator("unlearn", "example_id"))
    cb = SaliencyUnlearningCallback(forget_rows(trainer), objective="graddiff", ratio=0.5, progress=False,
                                    collate=DataCollatorForLanguageModeling(pad_token_id=0))  # fmt: skip
    trainer.add_callback(cb)
    before = snapshot(trainer.model)
    run(trainer)
    assert cb.mask is not None and all(".lora_" in n for n in cb.mask.names())
    b_rows = [cb.mask.vector(n) for n in cb.mask.names() if ".lora_B." in n]
    assert b_rows and any(0 < int(v.sum()) < v.numel() for v in b_rows), "the unit mask selected nothing"
    assert_mask_held(before, trainer, cb.mask)


@pytest.mark.compat(
    callback="routing", setup="trl", variant="peft_config=LoraConfig(modules_to_save=['mlp'])"
)
def test_routing_sft_peft_modules_to_save(tmp_path):
    """Dedicated MLP units named on the base model route through the trainable ``modules_to_save`` copies TRL's
    PeftModel makes: forget steps move only dedicated coordinates, retain steps only shared ones."""
    model = llama()
    ded = dedicated_mask(model, mlp_units=8, heads=0)
    for phase, label in (("forget", 1), ("retain", 0)):
        cb = GradientRoutingCallback(ded, strict=True)
        data = text_dataset(8, seed=label, routing=[label] * 8)
        args = sft_config(tmp_path / phase, max_steps=2, remove_unused_columns=False)
        trainer = sft_peft(model, args, data, cb, tag_collator("routing", homogeneous="routing"),
                           modules_to_save=["mlp"])  # fmt: skip
        model = trainer.model.get_base_model()  # the next phase wraps the same weights again
        before = snapshot(trainer.model)
        run(trainer)
        may = {}
        for n, p in ParamIndex(trainer.model).items():
            d = ded[n].bool().expand(p.shape) if n in ded else torch.zeros(p.shape, dtype=torch.bool)
            may[n] = (d if label == 1 else ~d) & p.requires_grad
        frozen, trained = frozen_and_trained(before, trainer.model, may)
        assert frozen == 0 and trained > 0, (phase, frozen, trained)
        assert cb.router.counts[phase] > 0
        assert_no_hooks(trainer)


@pytest.mark.compat(callback="routing", setup="trl", variant="peft_config=LoraConfig", expect="error")
def test_routing_sft_peft_frozen_dedicated_refused(tmp_path, request):
    data = text_dataset(8, routing=[1] * 8)
    args = sft_config(tmp_path, remove_unused_columns=False)
    trainer = sft_peft(llama(), args, data, GradientRoutingCallback(mlp_units=8), tag_collator("routing"))
    refused_before_any_step(request, trainer, ValueError, r"frozen.*modules_to_save")
    assert_no_hooks(trainer)


@pytest.mark.compat(callback="restoration", setup="trl", variant="peft_config=LoraConfig")
def test_restoration_sft_peft(tmp_path):
    """A reference taken from the base model before TRL wrapped it: at train end the effective layer-0 weights
    (``W + s·B·A``) equal it again, layer 1 keeps its trained adapter."""
    model = llama()
    reference = {n: p.detach().clone() for n, p in model.state_dict().items()}
    cb = LayerRestorationCallback(reference, "0:1", when=("train_end",))
    trainer = sft_peft(model, sft_config(tmp_path), text_dataset(), cb)
    run(trainer)
    deltas = effective_deltas(trainer.model)
    index = ParamIndex(trainer.model)
    for name, delta in deltas.items():
        effective = index.param(name).detach() + delta
        if name.startswith("model.layers.0."):
            assert moved(reference[name], effective) == 0, name
        else:
            assert int(delta.ne(0).sum()) > 0, name
    assert len(cb.reports) >= 1
    assert_no_hooks(trainer)


@pytest.mark.compat(callback="restoration", setup="trl", variant="peft_config=LoraConfig, when='save'")
def test_restoration_sft_peft_checkpoint(tmp_path):
    """The adapter checkpoint TRL saves (``adapter_model.safetensors``) gets its restored layers' adapters zeroed;
    the other layers keep theirs."""
    from safetensors.torch import load_file

    model = llama()
    reference = {n: p.detach().clone() for n, p in model.state_dict().items()}
    cb = LayerRestorationCallback(reference, "0:1", when=("save",))
    args = sft_config(tmp_path, save_strategy="steps", save_steps=3)
    trainer = sft_peft(model, args, text_dataset(), cb)
    run(trainer)
    saved = load_file(tmp_path / "checkpoint-3" / "adapter_model.safetensors")
    lora_b = {n: t for n, t in saved.items() if ".lora_B." in n}
    assert len(lora_b) == 4 and len(cb.reports) == 1 and len(cb.reports[0].adapters) == 2
    for name, tensor in lora_b.items():
        assert bool(tensor.eq(0).all()) == (".layers.0." in name), name
    assert_no_hooks(trainer)


@pytest.mark.compat(callback="gradient_mask", setup="trl", variant="DPOTrainer, peft_config=LoraConfig")
def test_gradient_mask_dpo_peft(tmp_path):
    """DPO with ``peft_config`` (no ref_model: TRL's reference is the adapter switched off); the mask is built on
    the PeftModel TRL made."""
    g = torch.Generator().manual_seed(0)
    rows = [
        {"prompt": _words(g, 4), "chosen": " " + _words(g, 3), "rejected": " " + _words(g, 3)}
        for _ in range(8)
    ]
    args = DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)  # fmt: skip
    trainer = DPOTrainer(model=llama(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer(), peft_config=lora_config())  # fmt: skip
    mask = random_mask(trainer.model)
    trainer.add_callback(GradientMaskCallback(mask))
    before = snapshot(trainer.model)
    run(trainer)
    assert_mask_held(before, trainer, mask)


@pytest.mark.compat(callback="unlearning", setup="trl", variant="peft_config=LoraConfig, given mask on base",
                    expect="error")  # fmt: skip
def test_unlearning_sft_peft_given_mask_on_unadapted_base_refused(tmp_path, request):
    """A saliency mask computed on the base model and handed to the callback: its entries on weights no adapter
    wraps cannot act after TRL wrapped the model — refused before a step, as for GradientMaskCallback."""
    data = text_dataset(8, unlearn=[i % 2 for i in range(8)])
    model = llama()
    mask = ParamMask.from_slices({"model.layers.1.mlp.down_proj.weight": (0, [0, 1])}, model)
    args = sft_config(tmp_path, remove_unused_columns=False)
    cb = SaliencyUnlearningCallback(data, objective="ga", mask=mask, progress=False)
    trainer = sft_peft(model, args, data, cb, tag_collator("unlearn"))
    refused_before_any_step(request, trainer, ValueError, r"down_proj.*Build the mask on the PeftModel")
    assert_no_hooks(trainer)
