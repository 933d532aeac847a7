"""Started by tests/distributed/fsdp2_callbacks.py (rank 0) as its own process, because it is expected to crash.

Shows that the reason AttributionAlignment gives for refusing ``integrated_gradients`` under FSDP2 is real: with the
refusal switched off, one training step of a ``fully_shard``-ed classifier (a one-rank gloo group) kills the process
with SIGSEGV, while the same step on the unsharded model completes. Prints ``unsharded ok`` before the sharded step.
"""

import socket
import sys

import torch
import torch.distributed as dist
import transformers as T
from torch.distributed.fsdp import fully_shard

import hfhooks.attribution.alignment as alignment
from hfhooks import TaggedCollator, TaggedDataset


def classifier():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)  # fmt: skip
    return T.LlamaForSequenceClassification(cfg)


def batch():
    ids = torch.randint(1, 48, (4, 10), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": torch.tensor(i % 2),
             "rationale": (torch.arange(10) < 4).float()} for i in range(4)]  # fmt: skip
    tagged = TaggedDataset(rows, tags=["rationale"])
    return TaggedCollator()([tagged[i] for i in range(4)])


def step(model):
    model.train()
    opts = {"prior": "rationale", "special_token_ids": [0], "steps": 2}
    with alignment.AttributionAlignment(model, "integrated_gradients", **opts):
        model(**batch())["loss"].backward()


def main():
    step(classifier())
    print("unsharded ok", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    model = classifier()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    alignment.is_dtensor = lambda t: False  # switch the refusal off
    step(model)
    print("sharded ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
