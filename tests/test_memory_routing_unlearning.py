"""Memory of routing, SalUn scoring and NPO (issue #13 item 3): tensor storage held, not peak RSS.

* the strict router holds index vectors, and during a forget-only step a snapshot of only the values that step
  must not change, gathered — no dense bool masks — and stays bit-identical to the dense algorithm;
* top-k counts where the scores live: no score chunk is copied to the CPU;
* SalUn scoring keeps one fp32 buffer per scored parameter and none for the others;
* NPO's precomputed reference equals a full reference-model copy (what NPO implementations usually keep).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from conftest import make_model, random_input_ids
from torch import nn

from hfhooks import (
    FORGET,
    RETAIN,
    UNLABELLED,
    ParamIndex,
    Router,
    UnlearningObjective,
    compute_saliency,
    dedicated_mask,
    reference_logprobs,
    topk_masks,
)
from hfhooks.unlearning.objectives import objective_hook, sequence_logprobs


def _held_tensors(obj, params: set[int], seen: set[int] | None = None) -> dict[int, int]:
    """``{storage pointer: bytes}`` of every tensor reachable from ``obj``'s attributes (lists, tuples, dicts,
    dataclasses), except the model's parameters and views of them; modules, masks and optimizers not entered."""
    seen = set() if seen is None else seen
    out: dict[int, int] = {}
    if id(obj) in seen or isinstance(obj, nn.Module | torch.optim.Optimizer):
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() not in params:
            out[storage.data_ptr()] = storage.nbytes()
        return out
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        children = list(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children = list(vars(obj).values())
    else:
        return out
    for child in children:
        out.update(_held_tensors(child, params, seen))
    return out


def _router_bytes(router: Router, model: nn.Module) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = {k: v for k, v in vars(router).items() if k not in ("model", "dedicated", "optimizer", "config")}
    return sum(_held_tensors(state, params).values())


def _forget_step_snapshot_bytes(arch: str) -> tuple[int, int, int]:
    """(bytes the router holds during a forget-only step, bytes of the values it must keep, index bytes)."""
    model = make_model(arch).train()  # routing acts on training forwards only
    ded = dedicated_mask(model, mlp_units=8, heads=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    router = Router(model, ded, optimizer=opt).attach()
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append(_router_bytes(router, model)))  # after the router's
    ids = random_input_ids(2, 6)
    model(input_ids=ids, labels=ids, routing=torch.full((2,), FORGET)).loss.backward()
    opt.step()
    router.detach()
    values = index_bytes = 0
    for name, p in ParamIndex(model).items():
        kept = p.numel() - (int(ded[name].sum()) if name in ded else 0)
        values += kept * p.element_size()
        if name in ded and ded.granularity(name) != "element":
            index_bytes += 8 * p.shape[0 if ded.granularity(name) == "row" else 1]  # int64 per row/column
        elif name in ded:
            index_bytes += p.numel()  # element masks (biases) keep their bool tensor
    return seen[0], values, index_bytes


def test_strict_forget_step_snapshot_is_gathered_values_only():
    for arch in ("llama", "qwen2"):  # qwen2: q/k/v biases carry element masks
        held, values, index_bytes = _forget_step_snapshot_bytes(arch)
        # index vectors (dedicated + shared rows/columns: one int64 per row or column) + the values, no bool masks
        assert values <= held <= values + index_bytes + 4096, (arch, held, values, index_bytes)


def test_router_holds_index_vectors_not_masks_and_reports_them():
    model = make_model("llama")
    ded = dedicated_mask(model, mlp_units=8, heads=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    router = Router(model, ded, optimizer=opt).attach()
    axis_len = sum(
        model.get_parameter(n).shape[0 if ded.granularity(n) == "row" else 1]
        for n in ded
        if ded.granularity(n) != "element"
    )
    assert _router_bytes(router, model) <= 8 * axis_len + 1024  # int64 per row / column (+ site vectors)
    held = router.held_bytes()
    assert held["snapshot"] == 0 and 0 < held["masks"] <= 8 * axis_len
    router.detach()


def _dense_reference_step(model, ded, opt, mode):
    """The strict algorithm with dense masks (what the router computes, written the obvious way)."""
    frozen = {}
    for n, p in ParamIndex(model).items():
        d = ded[n] if n in ded else torch.zeros(p.shape, dtype=torch.bool)
        if mode == FORGET:
            p.grad.masked_fill_(~d, 0)
            frozen[n] = ~d
        elif mode == RETAIN:
            p.grad.masked_fill_(d, 0)
            frozen[n] = d.expand(p.shape)
    saved = {n: ParamIndex(model).param(n).detach()[m].clone() for n, m in frozen.items()}
    opt.step()
    with torch.no_grad():
        for n, m in frozen.items():
            ParamIndex(model).param(n).masked_scatter_(m, saved[n])


def test_compact_strict_routing_is_bit_identical_to_dense_masks():
    torch.manual_seed(0)
    a = make_model("qwen2").train()
    b = copy.deepcopy(a)
    ded = dedicated_mask(a, mlp_units=8, heads=1)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    router = Router(a, ded, optimizer=opt_a).attach()
    # b: the same forward (retain zeroes dedicated activations) and gradient hooks, the step done by hand
    leaky = Router(b, ded, strict=False).attach()
    for i, mode in enumerate((FORGET, RETAIN, FORGET, UNLABELLED, RETAIN)):
        ids = random_input_ids(2, 6, seed=i)
        a(input_ids=ids, labels=ids, routing=torch.full((2,), mode)).loss.backward()
        opt_a.step()
        opt_a.zero_grad()
        b(input_ids=ids, labels=ids, routing=torch.full((2,), mode)).loss.backward()
        _dense_reference_step(b, ded, opt_b, mode)
        opt_b.zero_grad()
    router.detach(), leaky.detach()
    for (n, pa), (_, pb) in zip(ParamIndex(a).items(), ParamIndex(b).items()):
        assert torch.equal(pa, pb), n
        for key, va in opt_a.state[pa].items():
            assert torch.equal(va, opt_b.state[pb][key]), (n, key)


def test_topk_counts_on_the_scores_device(monkeypatch):
    moved = []
    original = torch.Tensor.cpu

    def spy(self, *args, **kwargs):
        moved.append(self.numel())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", spy)
    scores = {"a": torch.rand(300_000), "b": torch.rand(200, 500)}
    masks = topk_masks(scores, 0.3)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * 400_000)
    assert moved and max(moved) <= 1 << 16  # only 65 536-bin histograms leave the device


def test_saliency_keeps_one_fp32_buffer_per_scored_parameter_only():
    model = make_model("llama").to(torch.bfloat16)
    index = ParamIndex(model)
    scored = [n for n in index.names() if ".mlp." in n]
    ids = random_input_ids(4, 6)
    loader = [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in (0, 2)]
    scores = compute_saliency(model, loader, params=scored, progress=False)
    assert sorted(scores) == sorted(scored)
    assert all(t.dtype == torch.float32 and t.shape == index.param(n).shape for n, t in scores.items())
    held = sum(t.untyped_storage().nbytes() for t in scores.values())
    assert held == 4 * sum(index.param(n).numel() for n in scored)
    assert all(p.grad is None for p in model.parameters())  # every gradient was folded and freed


def test_saliency_folds_a_bf16_gradient_without_an_fp32_copy_of_it(monkeypatch):
    """On CPU an in-place fp32 += bf16 first copies the whole gradient to fp32 (TensorIterator promotes CPU
    inputs by copying them); the fold works in slices, so no upcast is as large as a scored gradient."""
    import hfhooks.masks.saliency as saliency

    monkeypatch.setattr(saliency, "_FOLD_SLICE", 64)
    model = make_model("llama").to(torch.bfloat16)
    index = ParamIndex(model)
    ids = random_input_ids(4, 6)
    loader = [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in (0, 2)]
    with torch.profiler.profile(profile_memory=True) as prof:
        scores = compute_saliency(model, loader, progress=False)
    upcasts = [e.cpu_memory_usage for e in prof.events() if e.name == "aten::_to_copy"]
    sizes = {4 * index.param(n).numel() for n in scores}  # an fp32 copy of one whole gradient
    assert not [u for u in upcasts if u in sizes and u > 4 * 64], "a whole gradient was upcast"
    # the same scores as folding each gradient whole in fp32
    monkeypatch.setattr(saliency, "_FOLD_SLICE", 1 << 30)
    whole = compute_saliency(model, loader, progress=False)
    assert all(torch.equal(scores[n], whole[n]) for n in scores)


def _npo_data(n=4):
    ids = random_input_ids(2 * n, 7)
    forget = [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]
    return forget, ids


def test_reference_logprobs_per_example_equal_the_batched_computation():
    model = make_model("llama")
    forget, ids = _npo_data()
    ref = reference_logprobs(model, forget, batch_size=4, progress=False)
    model.eval()
    with torch.no_grad():
        batched = sequence_logprobs(model(input_ids=ids[:4])["logits"], ids[:4], causal=True)[0]
    torch.testing.assert_close(ref, batched, rtol=0, atol=1e-6)


def test_npo_precomputed_reference_matches_a_reference_model_copy():
    """NPO as implementations with a frozen reference model compute it: loss and trained weights agree."""
    torch.manual_seed(0)
    model = make_model("llama")
    frozen_copy = copy.deepcopy(model).eval()  # the second model this library does not keep
    twin = copy.deepcopy(model)
    forget, ids = _npo_data()
    objective = UnlearningObjective("npo", beta=0.1, retain_weight=0.0)
    objective.reference = reference_logprobs(model, forget, batch_size=2, progress=False)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.05)
    model.train(), twin.train()  # the loss hook acts on training forwards; the tiny Llama has no dropout
    with objective_hook(model, objective):
        for step in range(3):
            rows = [step % 4, (step + 1) % 4]
            batch = ids[rows]
            flags, eid = torch.ones(2, dtype=torch.long), torch.tensor(rows)
            loss_a = model(input_ids=batch, labels=batch, unlearn=flags, example_id=eid)["loss"]
            with torch.no_grad():
                ref = sequence_logprobs(frozen_copy(input_ids=batch)["logits"], batch, causal=True)[0]
            logp, n_tok = sequence_logprobs(twin(input_ids=batch)["logits"], batch, causal=True)
            per = (2 / 0.1) * torch.nn.functional.softplus(0.1 * (logp - ref))
            loss_b = (per * n_tok).sum() / n_tok.sum()
            torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
            for opt, loss in ((opt_a, loss_a), (opt_b, loss_b)):
                opt.zero_grad()
                loss.backward()
                opt.step()
    for pa, pb in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
