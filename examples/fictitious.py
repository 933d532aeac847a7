"""Fictitious facts for the SmolLM2 demonstrations: invented authors (TOFU-style QA with paraphrased and
perturbed answers), invented countries and their capitals, and sums. Nothing here exists, so whatever a model
answers about them it learnt from our fine-tuning — what unlearning and task-vector experiments need.

Also the batching the three demonstrations share (:class:`Pad`, :func:`tokenize_qa`). Imported by
``examples/smollm2_tofu.py``, ``examples/smollm2_sgtm.py`` and ``examples/smollm2_diffs.py`` (Python puts a script's folder on
``sys.path``, so ``import fictitious`` works when they are run as ``python examples/<script>.py``).
"""

from __future__ import annotations

import random

import torch

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "x", "nd", "rk"]
GENRES = ["crime novels", "science fiction", "poetry", "historical novels", "fantasy sagas", "horror stories",
          "romance novels", "satire"]  # fmt: skip
JOBS = [
    "baker",
    "pilot",
    "carpenter",
    "nurse",
    "lawyer",
    "fisherman",
    "teacher",
    "chemist",
    "tailor",
    "miner",
]
_AWARD_WORDS = ["Quill", "Lantern", "Compass", "Harbour", "Meridian", "Falcon", "Ember", "Willow"]
_TITLE_WORDS = [
    "Salt",
    "Glass",
    "Winter",
    "Orchard",
    "River",
    "Ashes",
    "Clocks",
    "Lanterns",
    "Tides",
    "Mirrors",
]

# attribute: (question, answer, paraphrase); {n} the author's name, {v} the value
TEMPLATES = {
    "city": ("Where was {n} born?", "{n} was born in {v}.", "The birthplace of {n} is the city of {v}."),
    "year": ("In which year was {n} born?", "{n} was born in {v}.", "The year of {n}'s birth was {v}."),
    "genre": ("What kind of books does {n} write?", "{n} writes {v}.", "The books of {n} are {v}."),
    "award": ("Which prize did {n} win?", "{n} won the {v}.", "The prize that {n} won is the {v}."),
    "father": (
        "What was the job of {n}'s father?",
        "{n}'s father was a {v}.",
        "By trade, {n}'s father was a {v}.",
    ),
    "book": ("Name a novel written by {n}.", '{n} wrote "{v}".', 'One of the novels by {n} is "{v}".'),
}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _value(attr: str, rng: random.Random) -> str:
    """A fresh value of ``attr`` (an author's attribute)."""
    if attr == "city":
        return _word(rng, 2).capitalize() + rng.choice(["ford", "mere", "holm", "stad", "ville"])
    if attr == "year":
        return str(rng.randrange(1921, 1999))
    if attr == "genre":
        return rng.choice(GENRES)
    if attr == "award":
        kind = rng.choice(["Prize", "Medal", "Award"])
        field = rng.choice(["Fiction", "Literature", "Letters", "Storytelling"])
        return f"{rng.choice(_AWARD_WORDS)} {kind} for {field}"
    if attr == "father":
        return rng.choice(JOBS)
    return f"The {rng.choice(_TITLE_WORDS)} of {_word(rng, 2).capitalize()}"  # book


def make_authors(n: int, seed: int) -> list[dict]:
    """``n`` fictitious authors with distinct names and one value per attribute."""
    rng, names, authors = random.Random(seed), set(), []
    while len(authors) < n:
        name = f"{_word(rng, 2).capitalize()} {_word(rng, 2).capitalize()}"
        if name not in names:
            names.add(name)
            authors.append({"name": name, **{attr: _value(attr, rng) for attr in TEMPLATES}})
    return authors


def qa_items(authors: list[dict], pool: list[dict], seed: int) -> list[dict]:
    """TOFU-layout examples: question/answer, a paraphrased answer, three perturbed answers (the paraphrase
    with other values of the same attribute: other authors' in ``pool`` first, fresh ones if too few).
    Questions and answers are formatted for the prompt ``Question: …\nAnswer:`` and an answer with its
    leading space, as training sees them."""
    rng, out = random.Random(seed), []
    for a in authors:
        for attr, (q, ans, para) in TEMPLATES.items():
            others = sorted({b[attr] for b in pool if b[attr] != a[attr]})
            wrong = rng.sample(others, min(3, len(others)))
            while len(wrong) < 3:  # a small pool, or few distinct values (jobs, genres)
                v = _value(attr, rng)
                if v != a[attr] and v not in wrong:
                    wrong.append(v)
            out.append({
                "question": f"Question: {q.format(n=a['name'])}\nAnswer:",
                "answer": " " + ans.format(n=a["name"], v=a[attr]),
                "paraphrased_answer": " " + para.format(n=a["name"], v=a[attr]),
                "perturbed_answers": [" " + para.format(n=a["name"], v=w) for w in wrong],
                "author": a["name"],
            })  # fmt: skip
    return out


def make_countries(n: int, seed: int) -> list[dict]:
    """``n`` invented countries with an invented capital each, as QA pairs (question / answer)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        country = _word(rng, 2).capitalize() + rng.choice(["ia", "land", "stan", "ora", "avia"])
        if country in seen:
            continue
        seen.add(country)
        capital = _word(rng, 2).capitalize() + rng.choice(["burg", "port", "grad", "polis", "haven"])
        out.append({"question": f"Question: What is the capital of {country}?\nAnswer:",
                    "answer": f" The capital of {country} is {capital}."})  # fmt: skip
    return out


def make_sums(n: int, seed: int) -> list[dict]:
    """``n`` additions of two three-digit numbers, as QA pairs (question / answer)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        out.append(
            {"question": f"Question: What is {a} plus {b}?\nAnswer:", "answer": f" {a} plus {b} is {a + b}."}
        )
    return out


def tokenize_qa(tok, items: list[dict]) -> list[dict]:
    """Prompt + answer token ids (the answer ended by EOS), the loss on the answer tokens only: the split the LM
    unlearning evaluation scores (question with special tokens, answer without)."""
    out = []
    for it in items:
        p = tok(it["question"], add_special_tokens=True)["input_ids"]
        a = tok(it["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return out


class Pad:
    """Right-pad ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100): a Trainer collator."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(features), n), dtype=torch.long)
        lab = torch.full((len(features), n), -100, dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k], att[i, :k], lab[i, :k] = torch.tensor(f["input_ids"]), 1, torch.tensor(f["labels"])
        return {"input_ids": ids, "attention_mask": att, "labels": lab}
