"""Launched by tests/test_lm_evaluation.py under torchrun (2 ranks, gloo): LMUnlearningEvalCallback in a Trainer."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.*

from hfhooks import LMUnlearningEvalCallback, lm_reference, lm_unlearning_metrics
from hfhooks.unlearning.lm_evaluation import qa_batch
from tests.conftest import tiny_llama
from tests.test_lm_evaluation import FORGET, HOLDOUT, RETAIN, word_tokenizer

OPTIONS = dict(max_new_tokens=4, batch_size=2)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rank = int(os.environ["RANK"])
    tok = word_tokenizer()
    torch.manual_seed(1)
    reference = lm_reference(tiny_llama(), tok, FORGET, HOLDOUT, **OPTIONS)
    torch.manual_seed(0)
    model = tiny_llama()
    cb = LMUnlearningEvalCallback(
        tok, FORGET, RETAIN, holdout=HOLDOUT, reference=reference, every=2, select="forget_quality", **OPTIONS
    )
    args = T.TrainingArguments(
        output_dir=os.path.join(a.out, "trainer"), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        use_cpu=True, ddp_backend="gloo", report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    rows = [
        (tok(i["question"])["input_ids"], tok(i["answer"], add_special_tokens=False)["input_ids"])
        for i in FORGET
    ]
    pad = tok.pad_token_id
    T.Trainer(
        model=model, args=args, train_dataset=rows, data_collator=lambda b: qa_batch(b, pad), callbacks=[cb]
    ).train()
    final = lm_unlearning_metrics(model, tok, FORGET, RETAIN, holdout=HOLDOUT, reference=reference, **OPTIONS)
    with open(os.path.join(a.out, f"metrics{rank}.json"), "w") as f:
        json.dump(
            {"history": cb.history, "best_step": cb.best_step, "final": final, "reference": reference}, f
        )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(a.out, f"weights{rank}.safetensors"),
    )
    if torch.distributed.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
