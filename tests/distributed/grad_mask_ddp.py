"""Launched by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Trains a tiny Llama with a stock Trainer + GradientMaskCallback (AdamW, weight decay, accumulation, clipping)
and writes this rank's initial and final weights, and the mask, for the test to compare.
"""

import argparse
import os

import torch
import transformers as T
from safetensors.torch import save_file

from hfhooks import GradientMaskCallback, ParamIndex, ParamMask


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 48, (32, 10), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--freeze", default="hard")
    a = parser.parse_args()
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)  # same init on every rank
    cfg = T.LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = T.LlamaForCausalLM(cfg)
    index = ParamIndex(model)
    g = torch.Generator().manual_seed(1)
    mask = ParamMask.from_scores({n: torch.rand(p.shape, generator=g) for n, p in index.items()}, 0.4)
    initial = {n: p.detach().clone() for n, p in index.items()}
    args = T.TrainingArguments(
        output_dir=os.path.join(a.out, "trainer"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=5e-2,
        weight_decay=0.1,
        max_grad_norm=0.5,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    cb = GradientMaskCallback(mask, freeze=a.freeze)
    T.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb]).train()
    hooks = sum(len(p._backward_hooks or {}) for p in model.parameters())
    save_file(
        {f"initial::{n}": t for n, t in initial.items()}
        | {f"final::{n}": p.detach().contiguous() for n, p in index.items()},
        os.path.join(a.out, f"rank{rank}.safetensors"),
        metadata={"world_size": os.environ["WORLD_SIZE"], "hooks_left": str(hooks)},
    )
    if rank == 0:
        mask.save(os.path.join(a.out, "mask.safetensors"))

    if torch.distributed.is_initialized():  # exiting with live gloo threads can abort ("terminate called…")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
