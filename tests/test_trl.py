"""TRL glue: side-label columns through a trainer's own collator, losses carried through TRL's fused LM head,
and the refusals of options under which a callback could not act (the matrix cells are in
``tests/compat/test_compat_trl.py``)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import transformers
from conftest import tiny_llama

from hfhooks import GradientRoutingCallback, SaliencyUnlearningCallback, TaggedCollator
from hfhooks.core.loss_hooks import write_fused_loss
from hfhooks.trainer.guards import has_fused_lm_head, refuse_lossless_outputs


def test_tagged_collator_columns_from_plain_examples():
    """Named columns of plain dict examples become tags; the base collator never sees them."""
    seen = []

    def base(features):
        seen.extend(features)
        return transformers.default_data_collator(features)

    collate = TaggedCollator(base, columns=["routing"])
    batch = collate([{"input_ids": [1, 2, 3], "routing": 1}, {"input_ids": [4, 5, 6], "routing": 0}])
    assert batch["routing"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert all("routing" not in f for f in seen)


def test_tagged_collator_columns_missing_names_the_option():
    collate = TaggedCollator(columns=["unlearn"])
    with pytest.raises(KeyError, match=r"no column \['unlearn'\].*remove_unused_columns=False"):
        collate([{"input_ids": [1, 2]}])
    with pytest.raises(TypeError, match=r"columns='unlearn' must be a sequence"):
        TaggedCollator(columns="unlearn")


def test_tagged_collator_without_columns_still_refuses_plain_examples():
    with pytest.raises(TypeError, match="TaggedDataset"):
        TaggedCollator()([{"input_ids": [1, 2]}])


@pytest.mark.parametrize("num_items", [None, 23])
def test_write_fused_loss_gives_the_trainer_the_mean(num_items):
    """TRL computes ``−Σ log_probs / N``; after the write that is ``m · M / N`` (``N = M`` without
    ``num_items_in_batch``), and its gradient reaches ``m``'s inputs."""
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    w = torch.tensor(2.5, requires_grad=True)
    mean = w * 1.5
    outputs = {"log_probs": torch.randn(2, 4) * mask, "label_mask": mask}
    write_fused_loss(outputs, mean)
    n = mask.sum() if num_items is None else num_items
    trl_loss = -outputs["log_probs"].sum() / n
    assert torch.allclose(trl_loss, mean * mask.sum() / n)
    assert torch.equal(outputs["log_probs"][~mask], torch.zeros(int((~mask).sum())))
    trl_loss.backward()
    assert torch.allclose(w.grad, torch.tensor(1.5) * mask.sum() / n)


def test_write_fused_loss_add_keeps_the_log_probs():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    lp = torch.tensor([[-1.0, -2.0, 0.0]])
    outputs = {"log_probs": lp, "label_mask": mask}
    write_fused_loss(outputs, torch.tensor(0.5), mode="add")
    assert torch.allclose(-outputs["log_probs"].sum() / 2, -lp.sum() / 2 + 0.5)


def test_write_fused_loss_refuses_outputs_without_log_probs():
    with pytest.raises(ValueError, match="fused_lm_head=True but returned no log_probs"):
        write_fused_loss({"logits": torch.zeros(1, 2, 3)}, torch.tensor(1.0))


def test_liger_fused_cross_entropy_refused_for_logit_readers():
    args = types.SimpleNamespace(use_liger_kernel=True, liger_kernel_config=None)
    with pytest.raises(ValueError, match=r"use_liger_kernel=False.*fused_linear_cross_entropy': False"):
        refuse_lossless_outputs(args, "X", loss="logits")
    ok = types.SimpleNamespace(
        use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": False}
    )
    refuse_lossless_outputs(ok, "X", loss="logits")
    refuse_lossless_outputs(args, "X")  # a callback that reads no logits is not concerned


def test_liger_refused_by_the_unlearning_callback_before_training(tmp_path):
    """Through the callback, with real TrainingArguments, at on_train_begin (before the saliency pass)."""
    try:
        args = transformers.TrainingArguments(
            str(tmp_path), use_liger_kernel=True, use_cpu=True, report_to=[]
        )
    except Exception as e:  # pragma: no cover - a release that validates the kernel at construction
        pytest.skip(f"TrainingArguments(use_liger_kernel=True) cannot be built here: {e}")
    cb = SaliencyUnlearningCallback([{"input_ids": torch.tensor([1, 2])}], objective="ga", progress=False)
    with pytest.raises(ValueError, match="use_liger_kernel=False"):
        cb.on_train_begin(
            args, transformers.TrainerState(), transformers.TrainerControl(), model=tiny_llama()
        )
    assert cb.mask is None  # refused before the (costly) saliency pass


def test_random_labels_refused_on_a_fused_lm_head_before_the_saliency_pass(tmp_path):
    """SalUn's default objective needs class logits; TRL's fused head has none: refused at on_train_begin."""
    model = tiny_llama()

    def fused(self, *args, fused_lm_head=False, labels=None, **kwargs):  # TRL's add_fused_lm_head signature
        return type(self).forward(self, *args, labels=labels, **kwargs)

    model.forward = types.MethodType(fused, model)
    args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    cb = SaliencyUnlearningCallback([{"input_ids": torch.tensor([1, 2])}], progress=False)
    with pytest.raises(ValueError, match=r"random_labels.*objective='ga', 'graddiff' or 'npo'"):
        cb.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl(), model=model)
    assert cb.mask is None


def test_packing_and_padding_free_refused_for_per_example_labels():
    for option in ("packing", "padding_free"):
        args = types.SimpleNamespace(**{option: True})
        with pytest.raises(ValueError, match=rf"{option}=True .*SFTConfig\({option}=False"):
            refuse_lossless_outputs(args, "GradientRoutingCallback", per_example=True)
        refuse_lossless_outputs(args, "GradientMaskCallback")  # no per-example labels: fine


def test_has_fused_lm_head_sees_through_wrappers():
    """TRL patches ``forward`` with ``functools.wraps`` (the signature lies) and accelerate may wrap it again."""
    model = tiny_llama()
    assert not has_fused_lm_head(model)

    def fused(self, *args, fused_lm_head=False, labels=None, **kwargs):
        return type(self).forward(self, *args, labels=labels, **kwargs)

    model.forward = types.MethodType(fused, model)
    assert has_fused_lm_head(model)

    inner = model.forward

    def wrapper(*args, **kwargs):  # like accelerate's convert_outputs_to_fp32
        return inner(*args, **kwargs)

    wrapper.__wrapped__ = inner
    model.forward = wrapper
    assert has_fused_lm_head(model)


def test_routing_under_preference_config_refused():
    DPOConfig = type("DPOConfig", (), {})  # duck-typed by class name: TRL is not imported by hfhooks
    with pytest.raises(ValueError, match="preference pairs"):
        refuse_lossless_outputs(DPOConfig(), "GradientRoutingCallback", per_example=True)
    cb = GradientRoutingCallback(mlp_units=2)
    assert cb.router is None


# -- inside SFTTrainer ----------------------------------------------------------------------------------------
def _sft_weights(tmp_path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 60, (5 + i % 4,), generator=g).tolist(), "unlearn": i % 2,
             "example_id": i} for i in range(8)]  # fmt: skip
    torch.manual_seed(0)
    model = tiny_llama()
    forget = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows if r["unlearn"]]
    args = trl.SFTConfig(output_dir=str(tmp_path / f"{batch}x{accumulation}"), max_steps=1, optim="sgd",
                         learning_rate=0.5, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         report_to=[], use_cpu=True, bf16=False, save_strategy="no", remove_unused_columns=False,
                         gradient_checkpointing=False, dataloader_drop_last=False, seed=0)  # fmt: skip
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(), pad_token="[PAD]", eos_token="[EOS]"
    )
    collate = TaggedCollator(
        DataCollatorForLanguageModeling(pad_token_id=0), columns=["unlearn", "example_id"]
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, data_collator=collate)  # fmt: skip
    cb = SaliencyUnlearningCallback(forget, objective="graddiff", ratio=1.0, progress=False,
                                    collate=DataCollatorForLanguageModeling(pad_token_id=0))  # fmt: skip
    trainer.add_callback(cb)
    assert has_fused_lm_head(trainer.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_fused_objective_accumulation_equals_one_batch(tmp_path):
    """SalUn's objective through TRL's fused LM head under gradient accumulation (2 × 4) moves the weights as
    one batch of 8 does (plain SGD, so a mis-scaled loss would show): the carried loss is scaled as TRL's own."""
    one = _sft_weights(tmp_path, 8, 1)
    two = _sft_weights(tmp_path, 4, 2)
    torch.manual_seed(0)
    start = dict(tiny_llama().named_parameters())
    assert any(not torch.equal(one[n], start[n]) for n in one), "nothing trained: the check would be vacuous"
    for n in one:
        assert torch.allclose(one[n], two[n], rtol=1e-4, atol=1e-6), n
