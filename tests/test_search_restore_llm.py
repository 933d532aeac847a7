"""``search_restoration`` / ``search-restore`` at LLM scale: layer-output reuse, coarse-to-fine ranges,
``max_width`` as a fraction, the low-validity warning, chat-template-aware CRC prompts (tiny models only)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers as T
from conftest import make_model

from hfhooks.cli import main
from hfhooks.restoration.search import CRCPrompt, crc_prompts, search_restoration


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def char_tokenizer(chat: bool = False) -> T.PreTrainedTokenizerFast:
    """One token per character, so ``" 7"`` is two tokens (``" "``, ``"7"``), as digits are in SmolLM2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = " abcdefghijklmnopqrstuvwxyz0123456789.,:\n<>"
    vocab = {"[PAD]": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    if chat:
        out.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    return out


def pair(arch: str, layers: int):
    key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    return make_model(arch, seed=0, **{key: layers}), make_model(arch, seed=1, **{key: layers})


def toy_prompts(count: int = 12) -> list[CRCPrompt]:
    g = torch.Generator().manual_seed(0)
    return [
        CRCPrompt(
            tuple(torch.randint(0, 64, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()),
            tuple(range(10 + i % 5, 14 + i % 5)),
        )
        for i in range(count)
    ]


def quiet_search(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return search_restoration(*args, progress=False, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reuse_scores_equal_recomputing_and_runs_fewer_layers(arch):
    base, post = pair(arch, 6)
    prompts = toy_prompts()
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    handles = [m.register_forward_hook(count) for m in [*post.modules(), *base.modules()] if m.__class__.__name__
               in ("LlamaDecoderLayer", "GPT2Block")]  # fmt: skip
    runs = {}
    for reuse in (False, True):
        calls["n"] = 0
        runs[reuse] = (
            quiet_search(post, base, prompts, soup=0, stride=1, reuse=reuse, batch_size=5),
            calls["n"],
        )
    for h in handles:
        h.remove()
    (plain, plain_calls), (reused, reused_calls) = runs[False], runs[True]
    assert len(plain.ranges()) == len(reused.ranges()) == 21
    for a, b in zip(plain.rows, reused.rows, strict=True):
        assert (a["kind"], a["start"], a["end"]) == (b["kind"], b["start"], b["end"])
        for key in ("validity", "diversity", "diversity_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (a, b, key)
    assert plain.best["start"] == reused.best["start"] and plain.best["end"] == reused.best["end"]
    assert reused_calls < 0.75 * plain_calls  # replayed layers are not run
    assert all(type(m).__name__ != "_Stand" for m in post.modules())  # the layers are put back


def test_coarse_to_fine_scores_the_grid_then_the_neighbourhood_of_the_best():
    base, post = pair("llama", 20)
    res = quiet_search(post, base, toy_prompts(6), soup=0)  # default stride: round(20 / 10) = 2
    got = {(r["start"], r["end"]) for r in res.ranges()}
    grid = {(s, e) for s in range(0, 21, 2) for e in range(0, 21, 2) if s < e}
    assert grid <= got and len(got) < 20 * 21 // 2
    coarse = [r for r in res.ranges() if (r["start"], r["end"]) in grid]
    floor = 0.9 * res.post["validity"]
    eligible = [r for r in coarse if r["validity"] >= floor]
    c = max(eligible, key=lambda r: r["diversity"]) if eligible else max(coarse, key=lambda r: r["validity"])
    near = {(s, e) for s in range(c["start"] - 1, c["start"] + 2) for e in range(c["end"] - 1, c["end"] + 2)}
    near = {(s, e) for s, e in near if 0 <= s < e <= 20}
    assert got == grid | near
    candidates = [r for r in res.rows if r["kind"] in ("post", "range") and r["eligible"]]
    assert res.best is max(candidates, key=lambda r: r["diversity"])
    every = quiet_search(post, base, toy_prompts(6), soup=0, stride=1, max_width=3)
    assert len(every.ranges()) == 20 + 19 + 18


def test_max_width_fraction_and_bad_values():
    base, post = pair("llama", 8)
    res = quiet_search(post, base, toy_prompts(4), soup=0, stride=1, max_width=0.5)
    assert max(r["end"] - r["start"] for r in res.ranges()) == 4 and len(res.ranges()) == 8 + 7 + 6 + 5
    for bad in (0, -1, 1.5, 0.0):
        with pytest.raises(ValueError, match="max_width"):
            quiet_search(post, base, toy_prompts(4), soup=0, max_width=bad)
    with pytest.raises(ValueError, match="stride"):
        quiet_search(post, base, toy_prompts(4), soup=0, stride=0)


def test_low_validity_selection_warns():
    base, post = pair("llama", 4)
    prompts = toy_prompts(6)  # random ids: ~4/64 of the mass on the valid tokens
    with pytest.warns(UserWarning, match=r"validity 0\.\d+ < min_validity=0\.1"):
        res = search_restoration(post, base, prompts, soup=0, progress=False)
    assert res.best["validity"] < 0.1 and len(res.warnings) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert not search_restoration(post, base, prompts, soup=0, min_validity=0.0, progress=False).warnings


def test_crc_prompts_put_shared_answer_tokens_in_the_prompt():
    # " 7" is two tokens here (as digits are in SmolLM2): before, every answer was dropped (ValueError)
    tok = char_tokenizer()
    prompts = crc_prompts(tok, n=4)
    assert {p.label for p in prompts} == {"letters", "digits"} and len(prompts) == 8
    space = tok.convert_tokens_to_ids(" ")
    for p in prompts:
        assert p.input_ids[-1] == space and tok.decode(list(p.input_ids)).endswith("nswer: ")
        listed = tok.decode(list(p.input_ids)).split("set: ")[1].split(".")[0].split(", ")
        assert sorted(tok.convert_ids_to_tokens(list(p.valid))) == sorted(listed)


def test_crc_prompts_use_the_chat_template_when_there_is_one():
    tok = char_tokenizer(chat=True)
    prompts = crc_prompts(tok, n=3)
    for p in prompts:
        text = tok.decode(list(p.input_ids))
        # the user turn, then the generation prompt; no "Answer:" cue and no space before the answer
        assert text.startswith("<") and text.endswith(">:") and "Answer" not in text
        assert all(len(t) == 1 for t in tok.convert_ids_to_tokens(list(p.valid)))  # answer prefix ""
    plain = crc_prompts(tok, n=3, chat=False)
    assert all(tok.decode(list(p.input_ids)).endswith("nswer: ") for p in plain)
    with pytest.raises(ValueError, match="no chat template"):
        crc_prompts(char_tokenizer(), n=1, chat=True)


class SplitSeven:
    """A tokenizer whose "7" is two tokens that no other character shares; "x" is two tokens of its own."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        table = {"7": [1000, 55], "x": [1001, 120]}
        return {"input_ids": [i for ch in text for i in table.get(ch, [ord(ch)])]}


def test_dropped_answers_warn_and_no_answer_at_all_is_an_error():
    with pytest.warns(UserWarning, match=r"\['7'\] of class '789'"):
        prompts = crc_prompts(SplitSeven(), n=6, classes=("789",), set_size=(3, 3), answer_prefix="")
    assert all(set(p.valid) == {56, 57} for p in prompts)
    with pytest.raises(ValueError, match="single-token"):
        crc_prompts(SplitSeven(), n=2, classes=("7x",), answer_prefix="")


def test_cli_options_and_low_validity_stderr_line(capsys, tmp_path):
    base, post = pair("llama", 4)
    tok = char_tokenizer()
    for name, model in (("base", base), ("post", post)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    argv = ["search-restore", tmp_path / "post", tmp_path / "base", "--n", "3", "--soup", "0", "-q"]
    code = main([str(a) for a in [*argv, "--max-width", "0.5", "--stride", "1"]])
    out, err = capsys.readouterr()
    assert code == 0 and "7 ranges" in out  # widths 1 and 2 of 4 layers: the default is half the layers
    assert "warning: the selected candidate" in err and "min_validity=0.1" in err  # untrained: validity ~0.06
    code = main([str(a) for a in [*argv, "--max-width", "4", "--min-validity", "0"]])
    out, err = capsys.readouterr()
    assert code == 0 and "10 ranges" in out and "warning" not in err
    with pytest.raises(SystemExit):
        main([str(a) for a in [*argv, "--max-width", "1.5"]])
