"""Launched by tests/test_distributed.py under torchrun (2 ranks, gloo): SalUn + UnlearningEvalCallback."""

import argparse
import json
import os

import torch
import torch.nn.functional as F
import transformers as T
from safetensors.torch import save_file
from torch import nn

from hfhooks import (
    SaliencyUnlearningCallback,
    TaggedCollator,
    UnlearningEvalCallback,
    forget_retain_dataset,
    unlearning_metrics,
)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits, **({"loss": F.cross_entropy(logits, labels)} if labels is not None else {})}


def blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(99))[y] * 2 + torch.randn(n, 6, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = Classifier()
    train, test = blobs(101, 1), blobs(37, 2)  # odd sizes: shards are uneven
    forget, retain = train[:11], train[11:]
    ev = UnlearningEvalCallback(forget, retain, test, every=2)
    args = T.TrainingArguments(
        output_dir=os.path.join(a.out, "trainer"),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-2,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    cbs = [SaliencyUnlearningCallback(forget, ratio=0.5, progress=False), ev]
    T.Trainer(
        model=model,
        args=args,
        train_dataset=forget_retain_dataset(forget, retain),
        data_collator=TaggedCollator(),
        callbacks=cbs,
    ).train()
    final = unlearning_metrics(model, forget, retain, test)
    with open(os.path.join(a.out, f"metrics{rank}.json"), "w") as f:
        json.dump({"history": ev.history, "final": final}, f)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(a.out, f"weights{rank}.safetensors"),
    )

    if torch.distributed.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
