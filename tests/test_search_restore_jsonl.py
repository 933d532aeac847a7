"""``search-restore --prompts FILE.jsonl`` / :func:`hfhooks.load_crc_prompts`: the documented line formats, the
errors for malformed lines (``path:line`` and the expected format), chat-template encoding of text prompts, and the
CLI end to end on tiny checkpoints saved to disk."""

from __future__ import annotations

import json
import warnings

import pytest
import transformers as T
from conftest import VOCAB, make_model

from hfhooks import CRCPrompt, load_crc_prompts
from hfhooks.cli import main

CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,:\n"


def char_tokenizer(chat: bool = False) -> T.PreTrainedTokenizerFast:
    """One token per character (``" a"`` is two tokens); optionally with a minimal chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    if chat:
        out.chat_template = "{% for m in messages %}u:{{ m['content'] }}\n{% endfor %}a:"
    return out


def write(path, *rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_both_formats_blank_lines_and_labels(tmp_path):
    tok = char_tokenizer()
    path = write(tmp_path / "p.jsonl", {"input_ids": [3, 4], "valid": [10, 11], "label": "x"}, "",
                 {"prompt": "pick: a, b", "valid": ["a", "b"]})  # fmt: skip
    first, second = load_crc_prompts(path, tok, vocab_size=VOCAB)
    assert first == CRCPrompt((3, 4), (10, 11), "x")
    # default answer prefix " " (no chat): " a" is " " + "a", so the shared " " ends the prompt
    assert second.input_ids == tuple(ids(tok, "pick: a, b ")) and second.valid == tuple(ids(tok, "ab"))


def test_text_prompts_follow_the_chat_template():
    """A tokenizer with a chat template: the prompt is a user turn plus the generation prompt, answers without a
    space (as crc_prompts does); chat=False encodes the plain text."""
    tok = char_tokenizer(chat=True)
    import tempfile
    from pathlib import Path

    path = write(Path(tempfile.mkdtemp()) / "p.jsonl", {"prompt": "pick a or b", "valid": ["a", "b"]})
    (chat,) = load_crc_prompts(path, tok)
    assert chat.input_ids == tuple(ids(tok, "u:pick a or b\na:")) and chat.valid == tuple(ids(tok, "ab"))
    (plain,) = load_crc_prompts(path, tok, chat=False)
    assert plain.input_ids == tuple(ids(tok, "pick a or b "))
    with pytest.raises(ValueError, match="no chat template.*--no-chat"):
        load_crc_prompts(path, char_tokenizer(), chat=True)


GOOD = {"input_ids": [3, 4], "valid": [5]}


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", r"Expecting property name"),
        ([1, 2], r"expected a JSON object, got list"),
        ({"input_ids": [3]}, r"needs 'valid' and exactly one of"),
        ({"input_ids": [3], "prompt": "a", "valid": [4]}, r"needs 'valid' and exactly one of"),
        ({"text": "abc", "valid": ["a"]}, r"unknown keys \['text'\]"),
        ({"input_ids": [3, 1.5], "valid": [4]}, r"'input_ids' holds 1\.5"),
        ({"input_ids": [3, True], "valid": [4]}, r"'input_ids' holds True"),
        ({"input_ids": [3], "valid": [-1]}, r"'valid' holds -1"),
        ({"input_ids": [3], "valid": [VOCAB]}, rf"'valid' holds {VOCAB}.*vocabulary has {VOCAB} ids"),
        ({"input_ids": [], "valid": [4]}, r"'input_ids' must be a non-empty list"),
        ({"input_ids": [3], "valid": [4, 4]}, r"lists a token id twice"),
        ({"prompt": "a or b", "valid": "ab"}, r"'valid' a list of strings"),
        ({"prompt": "a or b", "valid": ["ab", "cd"]}, r"no answer .* is one token"),
    ],
)
def test_malformed_line_names_its_number_and_the_format(tmp_path, bad, match):
    path = write(tmp_path / "p.jsonl", GOOD, "", bad)
    with pytest.raises(ValueError, match=rf"p\.jsonl:3: .*{match}.*Expected one JSON object a line"):
        load_crc_prompts(path, char_tokenizer(), vocab_size=VOCAB)


def test_text_prompt_without_tokenizer_and_empty_file(tmp_path):
    path = write(tmp_path / "p.jsonl", {"prompt": "a or b", "valid": ["a"]})
    with pytest.raises(ValueError, match=r"p\.jsonl:1: a 'prompt' row needs the tokenizer"):
        load_crc_prompts(path)
    with pytest.raises(ValueError, match=r"holds no prompt"):
        load_crc_prompts(write(tmp_path / "e.jsonl", "", "  "))


def test_answers_that_are_not_one_token_are_a_warning_naming_the_line(tmp_path):
    path = write(tmp_path / "p.jsonl", GOOD, {"prompt": "a or bc", "valid": ["a", "bc"]})
    with pytest.warns(UserWarning, match=r"2:'bc'"):
        _, prompt = load_crc_prompts(path, char_tokenizer(), answer_prefix="")
    assert prompt.valid == tuple(ids(char_tokenizer(), "a"))


@pytest.fixture
def ckpts(tmp_path):
    tok = char_tokenizer()
    for name, seed in (("base", 0), ("post", 5)):
        make_model("llama", seed=seed, num_hidden_layers=2).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    return tmp_path


def search(capsys, tmp_path, *extra) -> tuple[int, str, str]:
    argv = ["search-restore", tmp_path / "post", tmp_path / "base", "--soup", "0", "--json", "-q", *extra]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_text_prompts_with_the_default_answer_prefix(ckpts, capsys):
    """Formerly each " a" (two tokens in this tokenizer) was dropped silently and the line then failed."""
    path = write(
        ckpts / "p.jsonl", {"prompt": "pick: a, b", "valid": ["a", "b"]}, {"input_ids": [3], "valid": [4, 5]}
    )
    code, out, err = search(capsys, ckpts, "--prompts", path)
    assert code == 0, err
    assert len(json.loads(out)["rows"]) == 2 + 2  # post, base, and the 2 ranges up to --max-width 0.5


def test_cli_out_of_vocabulary_id_names_the_line(ckpts, capsys):
    path = write(ckpts / "p.jsonl", GOOD, {"input_ids": [3], "valid": [VOCAB + 7]})
    code, _, err = search(capsys, ckpts, "--prompts", path)
    assert code == 1 and "p.jsonl:2:" in err and f"vocabulary has {VOCAB} ids" in err


def test_cli_generator_options_with_prompts_are_refused_before_loading(tmp_path, capsys):
    path = write(tmp_path / "p.jsonl", GOOD)
    code, _, err = search(capsys, tmp_path / "missing", "--prompts", path, "--n", "4", "--seed", "1")
    assert code == 1 and "--n, --seed shape the generated prompts" in err


def test_text_options_on_an_ids_only_file_warn(tmp_path):
    path = write(tmp_path / "p.jsonl", GOOD)
    with pytest.warns(UserWarning, match=r"only input_ids rows.*answer_prefix.*do nothing"):
        load_crc_prompts(path, char_tokenizer(), answer_prefix="")
    mixed = write(tmp_path / "m.jsonl", GOOD, {"prompt": "a or b", "valid": ["a", "b"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_crc_prompts(mixed, char_tokenizer(), answer_prefix="", chat=False)) == 2
