"""Why ``GradientMask`` masks with a tensor hook (every gradient of the parameter, as autograd produces it) and
not in place on ``.grad`` after accumulation: the latter was tried (tenth session) and reverted because these
three behaviours broke. Each test here fails with the in-place form."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_attribution import _bert, _data

from hfhooks import AttributionAlignment, GradientMask, ParamMask, TaggedCollator, TaggedDataset

X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


def _linear() -> tuple[torch.nn.Linear, ParamMask]:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3), ParamMask({"weight": torch.tensor([[1, 0, 1, 0]] * 3, dtype=torch.bool)})


@pytest.mark.parametrize("freeze", ["grad", "hard"])
def test_autograd_grad_returns_masked_gradients(freeze):
    """``torch.autograd.grad`` never writes ``.grad``: only a tensor hook sees what it returns (functional and
    per-sample loops assign the result to ``.grad`` themselves)."""
    m, mask = _linear()
    with GradientMask(m, mask, freeze=freeze, others="train").attach():
        (g,) = torch.autograd.grad(m(X).pow(2).sum(), [m.weight])
    assert bool((g[~mask["weight"]] == 0).all()) and bool((g[mask["weight"]] != 0).any())


def test_a_post_accumulate_hook_registered_earlier_sees_masked_gradients():
    """Post-accumulate hooks run in registration order; one registered before attach (gradient logging, an
    optimizer stepped inside backward) must already see the masked gradient."""
    m, mask = _linear()
    seen = []
    m.weight.register_post_accumulate_grad_hook(
        lambda p: seen.append(p.grad[~mask["weight"]].abs().sum().item())
    )
    with GradientMask(m, mask, freeze="grad", others="train").attach():
        m(X).pow(2).sum().backward()
    assert seen == [0.0]


def test_the_attribution_self_check_sees_the_mask():
    """AttributionAlignment checks with ``torch.autograd.grad`` that its term reaches a trainable coordinate; with
    every parameter that could carry it frozen by a GradientMask, that check must still raise."""
    model = _bert()
    model.train()
    mask = ParamMask(
        {
            n: torch.ones(p.shape, dtype=torch.bool)
            for n, p in model.named_parameters()
            if n == "classifier.bias"
        }
    )
    batch = TaggedCollator()([TaggedDataset(_data(), tags=["rationale"])[i] for i in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with (
            GradientMask(model, mask, freeze="grad").attach(),
            pytest.raises(RuntimeError, match="sends no gradient to any trainable parameter"),
            AttributionAlignment(model, "grad_x_input", prior="rationale"),
        ):
            model(**batch)
