"""``compute_saliency`` against hand computations with ``torch.autograd.grad``; the model is left as found."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from hfhooks import SCORES, compute_saliency

PARAM_SCORES = [s for s in SCORES if s != "act_x_grad"]


# -- helpers --------------------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    """Everything compute_saliency promises to leave untouched."""
    return {
        "training": [(name, m.training) for name, m in model.named_modules()],
        "params": [
            (
                name,
                p.detach().clone(),
                p.requires_grad,
                p.grad,
                None if p.grad is None else p.grad.clone(),
            )
            for name, p in model.named_parameters()
        ],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert len(after["params"]) == len(before["params"])
    for (name, data, rg, grad, grad_copy), (name2, data2, rg2, grad2, _) in zip(
        before["params"], after["params"]
    ):
        assert name == name2
        assert torch.equal(data, data2), f"{name}: weights changed"
        assert rg == rg2, f"{name}: requires_grad changed"
        assert grad2 is grad, f"{name}: .grad is not the original tensor"
        if grad is not None:
            assert torch.equal(grad, grad_copy), f"{name}: .grad values changed"


def combine(score: str, grads: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    grads = [g.float() for g in grads]
    if score == "grad_abs_sum":
        return torch.stack(grads).sum(0).abs()
    if score == "grad_sum_abs":
        return torch.stack([g.abs() for g in grads]).sum(0)
    if score == "fisher":
        return torch.stack([g * g for g in grads]).sum(0)
    assert score == "grad_x_weight"
    return (weight.detach().float() * torch.stack(grads).sum(0)).abs()


def hand_scores(model, batches, loss_fn, names_to_params: dict[str, nn.Parameter], score: str) -> dict:
    """Per-batch ``torch.autograd.grad`` on a deep copy in eval mode, folded by ``combine``."""
    twin = copy.deepcopy(model).eval()
    twin_params = dict(twin.named_parameters())
    own_names = {id(p): n for n, p in model.named_parameters()}
    targets = {name: twin_params[own_names[id(p)]] for name, p in names_to_params.items()}
    for p in twin.parameters():
        p.requires_grad_(False)
    for p in targets.values():
        p.requires_grad_(True)
    per_batch: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    for batch in batches:
        loss = loss_fn(twin, batch)
        grads = torch.autograd.grad(loss, list(targets.values()))
        for n, g in zip(targets, grads):
            per_batch[n].append(g)
    return {n: combine(score, per_batch[n], targets[n]) for n in targets}


def assert_scores_close(got, want):
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


# -- two-layer MLP with a custom loss -------------------------------------------------------------------------


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(p=0.9), nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter
    model.train()
    model[3].eval()  # mixed training flags must come back exactly
    model[0].weight.grad = torch.randn(8, 5)  # pre-existing gradients must come back exactly
    model[3].bias.grad = torch.randn(3)
    return model


def mlp_loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y) * 3.0 - 0.1 * model(x).sum()


def mlp_batches(n=4, size=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 5, generator=g), torch.randn(size, 3, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("score", PARAM_SCORES)
def test_mlp_scores_match_hand_computation(score):
    model = make_mlp()
    batches = mlp_batches()
    before = snapshot(model)
    got = compute_saliency(model, batches, score=score, loss_fn=mlp_loss, progress=False)
    assert_unchanged(model, before)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == {"0.weight", "3.weight", "3.bias"}  # frozen 0.bias skipped under 'trainable'
    assert_scores_close(got, hand_scores(model, batches, mlp_loss, trainable, score))
    assert got.metadata == {"score": score, "batches": 4, "examples": 24}


@pytest.mark.parametrize("score", PARAM_SCORES)
def test_mlp_all_params_scores_frozen_ones_too(score):
    model = make_mlp()
    batches = mlp_batches()
    before = snapshot(model)
    got = compute_saliency(model, batches, score=score, loss_fn=mlp_loss, params="all", progress=False)
    assert_unchanged(model, before)
    assert model[0].bias.requires_grad is False
    assert set(got) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert got["0.bias"].abs().sum() > 0
    assert_scores_close(got, hand_scores(model, batches, mlp_loss, dict(model.named_parameters()), score))


def test_mlp_selected_params_and_max_batches():
    model = make_mlp()
    batches = mlp_batches(n=5)
    got = compute_saliency(
        model, batches, score="fisher", loss_fn=mlp_loss, params=["3.*"], max_batches=2, progress=False
    )
    assert set(got) == {"3.weight", "3.bias"}
    assert got.metadata["batches"] == 2
    targets = {n: p for n, p in model.named_parameters() if n.startswith("3.")}
    assert_scores_close(got, hand_scores(model, batches[:2], mlp_loss, targets, "fisher"))


def test_scoring_runs_in_eval_mode_dropout_off():
    model = make_mlp()
    assert model[2].training  # dropout p=0.9 active if the model were scored in train mode
    batches = mlp_batches()
    first = compute_saliency(model, batches, loss_fn=mlp_loss, progress=False)
    second = compute_saliency(model, batches, loss_fn=mlp_loss, progress=False)
    for n in first:
        assert torch.equal(first[n], second[n])
    seen = []

    def spy(model, batch):
        seen.append([m.training for m in model.modules()])
        return mlp_loss(model, batch)

    compute_saliency(model, batches, loss_fn=spy, progress=False)
    assert seen and not any(any(flags) for flags in seen)
    assert model.training and model[2].training and not model[3].training


def test_model_restored_when_the_loss_raises():
    model = make_mlp()
    before = snapshot(model)

    def boom(model, batch):
        mlp_loss(model, batch).backward()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compute_saliency(model, mlp_batches(), loss_fn=boom, progress=False)
    assert_unchanged(model, before)


def test_empty_dataloader_and_bad_arguments():
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no batches"):
        compute_saliency(model, [], loss_fn=mlp_loss, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        compute_saliency(model, iter(()), loss_fn=mlp_loss, params="all", progress=False)
    with pytest.raises(ValueError, match="score="):
        compute_saliency(model, mlp_batches(), score="magnitude", loss_fn=mlp_loss, progress=False)
    assert_unchanged(model, before)
    frozen = make_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        compute_saliency(frozen, mlp_batches(), loss_fn=mlp_loss, progress=False)


def test_loss_that_ignores_scored_params():
    model = make_mlp()
    with pytest.raises(ValueError, match="does not depend"):
        compute_saliency(
            model, mlp_batches(), loss_fn=lambda m, b: b[0].sum(), params=["3.bias"], progress=False
        )


# -- tiny Llama (HF model, dict batches, `.loss`) -------------------------------------------------------------

VOCAB = 48


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(cfg)
    return model.train()


def llama_batches(n=3, bsz=2, seq=7, labels=True):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()} if labels else {"input_ids": ids})
    return out


def hf_loss(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize("score", ["grad_abs_sum", "fisher"])
def test_llama_default_loss_matches_hand_computation(score):
    model = tiny_llama()
    model.model.embed_tokens.weight.grad = torch.ones_like(model.model.embed_tokens.weight)
    batches = llama_batches()
    before = snapshot(model)
    got = compute_saliency(model, batches, score=score, progress=False)
    assert_unchanged(model, before)
    assert set(got) == {n for n, _ in model.named_parameters()}
    assert got.metadata == {"score": score, "batches": 3, "examples": 6}
    assert_scores_close(got, hand_scores(model, batches, hf_loss, dict(model.named_parameters()), score))


def test_llama_missing_labels_without_loss_fn():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="labels"):
        compute_saliency(model, llama_batches(labels=False), progress=False)
    assert_unchanged(model, before)
    got = compute_saliency(  # a loss_fn makes label-free batches fine
        model,
        llama_batches(labels=False),
        loss_fn=lambda m, b: m(**b).logits.logsumexp(-1).mean(),
        params=["lm_head.weight"],
        progress=False,
    )
    assert set(got) == {"lm_head.weight"}


@pytest.mark.parametrize("layer", [0, 1], ids=["first", "last"])
def test_llama_act_x_grad_matches_hand_computation(layer):
    model = tiny_llama()
    batches = llama_batches(n=3, bsz=3, seq=6)
    before = snapshot(model)
    got = compute_saliency(model, batches, score="act_x_grad", progress=False)
    assert_unchanged(model, before)
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert list(got) == names
    assert got.metadata == {"score": "act_x_grad", "batches": 3, "examples": 9}

    twin = copy.deepcopy(model).eval()
    modules = [twin.model.layers[i].mlp.down_proj for i in range(2)]
    totals = [torch.zeros(24) for _ in modules]
    n_examples = 0
    for batch in batches:
        captured: list[torch.Tensor] = [None, None]
        handles = [
            m.register_forward_pre_hook(lambda mod, args, i=i, cap=captured: cap.__setitem__(i, args[0]))
            for i, m in enumerate(modules)
        ]
        try:
            loss = twin(**batch).loss
        finally:
            for h in handles:
                h.remove()
        grads = torch.autograd.grad(loss, captured)
        for i, (a, g) in enumerate(zip(captured, grads)):
            totals[i] += (a.detach() * g).abs().amax(dim=1).sum(0)  # max over positions, sum over examples
        n_examples += batch["input_ids"].shape[0]
    assert got[names[layer]].shape == (24,)
    torch.testing.assert_close(got[names[layer]], totals[layer] / n_examples, rtol=1e-5, atol=1e-8)


def test_llama_act_x_grad_explicit_modules_and_empty_loader():
    model = tiny_llama()
    got = compute_saliency(
        model,
        llama_batches(n=1),
        score="act_x_grad",
        modules=["model.layers.1.mlp.down_proj"],
        progress=False,
    )
    assert list(got) == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="no batches"):
        compute_saliency(model, [], score="act_x_grad", progress=False)


# -- PEFT LoRA ------------------------------------------------------------------------------------------------


def lora_llama():
    import peft

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(tiny_llama(), cfg)


def test_lora_default_scores_only_adapters():
    model = lora_llama()
    before = snapshot(model)
    got = compute_saliency(model, llama_batches(), progress=False)
    assert_unchanged(model, before)
    assert got and all(".lora_" in n for n in got)
    assert len(got) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in got
    assert not any(n.startswith("base_model") for n in got)
    full_names = dict(model.named_parameters())
    hand = hand_scores(
        model,
        llama_batches(),
        hf_loss,
        {n: full_names[f"base_model.model.{n}"] for n in got},
        "grad_abs_sum",
    )
    assert_scores_close(got, hand)


def test_lora_base_scores_base_weights_with_canonical_names():
    model = lora_llama()
    before = snapshot(model)
    got = compute_saliency(model, llama_batches(), params="base", progress=False)
    assert_unchanged(model, before)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    assert not any(".lora_" in n or "base_layer" in n or n.startswith("base_model") for n in got)
    base = tiny_llama()
    assert set(got) == {n for n, _ in base.named_parameters()}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert got[q].shape == base.get_parameter(q).shape
    live = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    hand = hand_scores(model, llama_batches(), hf_loss, {q: live}, "grad_abs_sum")
    torch.testing.assert_close(got[q], hand[q], rtol=1e-5, atol=1e-7)
