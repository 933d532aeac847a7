"""Shared fixtures: tiny models of every supported layout, built from configs (never downloaded).

Every factory builds in milliseconds: hidden size 32, 4 attention heads, 2 layers, vocabulary 64. The
architectures cover the layouts :mod:`hfhooks.core.layers` knows about:

* ``llama`` — separate q/k/v/o ``nn.Linear``, grouped-query attention (4 query heads, 2 KV heads), gated MLP;
* ``mistral`` — same layout as Llama (GQA), different classes;
* ``qwen2`` — Llama layout with q/k/v biases;
* ``gpt2`` — ``Conv1D`` weights stored ``(in, out)``, fused ``c_attn`` with columns ``[q | k | v]``, tied
  embeddings;
* ``neox`` — GPT-NeoX, fused ``query_key_value`` interleaved per head (``[q_h | k_h | v_h]``);
* ``bert`` — an encoder (``BertForSequenceClassification``) with biases everywhere.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from unittest import mock

import pytest

# DeepSpeed (the `deepspeed` extra) prints "Setting accelerator to CPU…" from its first import (accelerate's
# extract_model_from_parallel imports it), which would land in doctest outputs; naming the accelerator silences it
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import transformers
from packaging.version import Version
from torch import nn

# One intra-op thread per test process: `make test` runs two xdist workers on two cores, and oversubscribed
# torch threads make small tensor ops tens of times slower under contention.
torch.set_num_threads(1)

TRANSFORMERS_VERSION = Version(transformers.__version__).release
"""``(major, minor, patch)`` of transformers, for explicit version gates (``make test-min`` runs the oldest)."""
PEFT_VERSION = Version(importlib.metadata.version("peft")).release

VOCAB = 64
HIDDEN = 32
HEADS = 4
KV_HEADS = 2  # GQA archs: 2 query heads per KV head
LAYERS = 2
INTERMEDIATE = 64
POSITIONS = 32


def tiny_llama(**overrides) -> transformers.LlamaForCausalLM:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def tiny_mistral(**overrides) -> transformers.MistralForCausalLM:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=POSITIONS,
        sliding_window=None,
    )
    cfg.update(overrides)
    return transformers.MistralForCausalLM(transformers.MistralConfig(**cfg))


def tiny_qwen2(**overrides) -> transformers.Qwen2ForCausalLM:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))


def tiny_gpt2(**overrides) -> transformers.GPT2LMHeadModel:
    cfg = dict(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))


def tiny_neox(**overrides) -> transformers.GPTNeoXForCausalLM:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg.update(overrides)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**cfg))


def tiny_bert(**overrides) -> transformers.BertForSequenceClassification:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        num_labels=2,
    )
    cfg.update(overrides)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**cfg))


MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "gpt2": tiny_gpt2,
    "neox": tiny_neox,
    "bert": tiny_bert,
}
ARCHS = tuple(MODEL_FACTORIES)
GQA_ARCHS = ("llama", "mistral", "qwen2")


def make_model(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A fresh tiny model of ``arch`` in eval mode (no dropout), with deterministic weights."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODEL_FACTORIES[arch](**overrides)
    return model.eval()


def random_input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Copy ``@pytest.mark.compat(callback=..., setup=...)`` (and the library versions) into the JUnit XML
    properties of each test, so ``scripts/compat_matrix.py`` builds docs/compatibility.md from a ``--junitxml``
    report."""
    import platform

    import accelerate
    import peft

    versions = (f"python {platform.python_version()}, torch {torch.__version__}, transformers "
                f"{transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}")  # fmt: skip
    for item in items:
        marker = item.get_closest_marker("compat")
        if marker is not None:
            item.user_properties.extend((f"compat_{k}", str(v)) for k, v in sorted(marker.kwargs.items()))
            item.user_properties.append(("compat_versions", versions))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _environ() -> Iterator[None]:
    """Restore ``os.environ`` after each test: ``TrainingArguments`` of transformers < 5 export their settings
    (``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_DYNAMO_BACKEND``, ``ACCELERATE_USE_FSDP``…) into the
    environment, where every later Trainer of the worker would pick them up (bf16, compiled models, FSDP)."""
    with mock.patch.dict(os.environ):
        yield


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def model(arch: str) -> nn.Module:
    return make_model(arch)


@pytest.fixture
def gloo_group() -> Iterator[None]:
    """A single-process gloo process group, so DDP / FSDP can wrap a model on CPU; destroyed afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - only if a test leaked a group
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def lora(model: nn.Module, target_modules, modules_to_save=None, **kw) -> nn.Module:
    """``peft.get_peft_model`` with a tiny LoRA config (warnings about tiny/untied models silenced)."""
    import peft

    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=target_modules, modules_to_save=modules_to_save, **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, cfg)


def randomize_trainable(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Overwrite every trainable parameter with seeded normal noise × ``scale`` (a fresh LoRA's B is zero, so
    its Δ would be too); returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def skip_unless_trainer_resumes() -> None:
    """transformers before ~4.50 torch.load()s its checkpoint's numpy RNG state with torch's default
    ``weights_only=True`` (since torch 2.6), so no run resumes there at all (with or without hfhooks)."""
    if "weights_only" not in inspect.getsource(transformers.Trainer._load_rng_state):
        pytest.skip(
            "this transformers' Trainer cannot resume under torch >= 2.6 (numpy RNG state, weights_only)"
        )
