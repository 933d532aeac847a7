"""hfhooks metrics in real TensorBoard event files, written by a stock Trainer with ``report_to=["tensorboard"]``.

``tests/test_resume_and_reporting.py`` checks the order of callbacks with a stand-in reporter; here transformers'
own ``TensorBoardCallback`` writes through tensorboardX (its fallback when ``torch.utils.tensorboard`` cannot
import the ``tensorboard`` package; the ``dev`` extra installs tensorboardX) and the event files are read back
byte by byte: ``routing/*``, ``align/*`` and ``unlearn/*`` must be there, at the steps and with the values the
callbacks logged.
"""

from __future__ import annotations

import dataclasses
import struct
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import transformers as T
from conftest import make_model
from test_resume_and_reporting import _args, _lm_data

from hfhooks import (
    AttributionAlignmentCallback,
    GradientRoutingCallback,
    TaggedCollator,
    TaggedDataset,
    UnlearningEvalCallback,
)

tensorboardX = pytest.importorskip("tensorboardX")
from tensorboardX.proto.event_pb2 import Event  # noqa: E402  (after the importorskip)
from tensorboardX.record_writer import masked_crc32c  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under ``log_dir``: ``{tag: {step: value}}``.

    An event file is a sequence of TFRecords: an 8-byte little-endian length, the masked CRC-32C of those 8
    bytes, the serialized ``Event``, the masked CRC-32C of the event. Both checksums are verified, so a torn or
    misread file fails here rather than passing with fewer tags.
    """
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {log_dir}"
    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            assert header_crc == masked_crc32c(header), f"{path}: bad length checksum at byte {pos}"
            record = data[pos + 12 : pos + 12 + length]
            (record_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert len(record) == length and record_crc == masked_crc32c(record), (
                f"{path}: torn record at {pos}"
            )
            pos += 16 + length
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag][event.step] = value.simple_value
                elif value.HasField("tensor") and value.tensor.float_val:  # new-style scalars
                    scalars[value.tag][event.step] = value.tensor.float_val[0]
    return dict(scalars)


def as_float32(x: float) -> float:
    """What TensorBoard stores of ``x``: a 32-bit float."""
    return float(np.float32(x))


def run_with_tensorboard(
    tmp_path: Path, model, dataset, callbacks, monkeypatch, eval_dataset=None, **kw
) -> tuple[T.Trainer, Path]:
    """A stock Trainer logging every step to TensorBoard in ``tmp_path/"tb"``; returns it and that directory.

    transformers 4.x writes to ``args.logging_dir``; 5.x dropped that argument and reads
    ``TENSORBOARD_LOGGING_DIR`` (else ``output_dir/runs/…``): both are pointed at the same directory.
    ``data_seed`` (which ``_args`` sets) needs accelerate ≥ 1.1 and ``make test-min`` pins 1.0.
    """
    log_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))
    if "logging_dir" in {f.name for f in dataclasses.fields(T.TrainingArguments)}:
        kw["logging_dir"] = str(log_dir)
    args = _args(
        tmp_path / "out", report_to=["tensorboard"], logging_strategy="steps", logging_steps=1,
        save_strategy="no", data_seed=None, **kw,
    )  # fmt: skip
    trainer = T.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=TaggedCollator(),
        callbacks=callbacks,
    )
    assert any(type(cb).__name__ == "TensorBoardCallback" for cb in trainer.callback_handler.callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, log_dir


def test_routing_metrics_in_tensorboard_event_files(tmp_path, monkeypatch):
    """Item 15: ``routing/*`` reach TensorBoard at every logged step, with the Trainer's logged values (the old
    code added them after TensorBoardCallback had written the step: the files held only train/loss & co)."""
    data = _lm_data()
    labels = [i % 2 for i in range(len(data))]
    ds = TaggedDataset(data, tags={"routing": labels}, group_by="routing", batch_size=2)
    cb = GradientRoutingCallback(mlp_units=8, heads=1)
    trainer, log_dir = run_with_tensorboard(
        tmp_path, make_model("llama"), ds, [cb], monkeypatch, per_device_train_batch_size=1, max_steps=4
    )
    scalars = read_scalars(log_dir)
    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == [1, 2, 3, 4]
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]  # the reporter itself works
    for kind in ("forget", "retain", "unlabelled"):
        tag = f"train/routing/{kind}_batches"
        assert tag in scalars, f"{tag} missing from TensorBoard; tags: {sorted(scalars)}"
        assert scalars[tag] == {s: as_float32(e[f"routing/{kind}_batches"]) for s, e in logged.items()}
    for step in range(1, 5):  # one batch a step, each routed as forget or retain, none unlabelled
        forget, retain = (
            scalars["train/routing/forget_batches"][step],
            scalars["train/routing/retain_batches"][step],
        )
        assert forget + retain == step and scalars["train/routing/unlabelled_batches"][step] == 0
    assert scalars["train/routing/forget_batches"][4] == cb.router.counts["forget"] > 0


def test_alignment_and_unlearning_metrics_in_tensorboard_event_files(tmp_path, monkeypatch):
    """Item 15: two hfhooks callbacks in one run: ``align/*`` at every step, ``unlearn/*`` on the callback's own
    schedule, and ``eval_unlearn/*`` at each Trainer evaluation (TensorBoard's ``eval/unlearn/*``), all equal to
    what the callbacks computed."""
    from test_attribution import _bert, _data

    rows = _data(16)
    no_rationale = [{k: v for k, v in r.items() if k != "rationale"} for r in rows]
    ds = TaggedDataset(rows, tags=["rationale"])
    collate = T.default_data_collator
    evaluator = UnlearningEvalCallback(
        no_rationale[:4], no_rationale[4:12], no_rationale[12:], every=2, collate=collate
    )
    align = AttributionAlignmentCallback("grad_x_input", prior="rationale", weight=1.0)
    trainer, log_dir = run_with_tensorboard(
        tmp_path, _bert(), ds, [align, evaluator], monkeypatch, max_steps=4,
        eval_strategy="steps", eval_steps=4, eval_dataset=TaggedDataset(rows[12:], tags=["rationale"]),
    )  # fmt: skip
    scalars = read_scalars(log_dir)
    history = trainer.state.log_history

    for key in ("align/term", "align/share"):
        tag = f"train/{key}"
        assert tag in scalars, f"{tag} missing from TensorBoard; tags: {sorted(scalars)}"
        expected = {e["step"]: as_float32(e[key]) for e in history if key in e}
        assert sorted(expected) == [1, 2, 3, 4] and scalars[tag] == expected

    by_step = {h["step"]: h for h in evaluator.history}
    for metric in ("UA", "RA", "TA", "MIA"):
        tag = f"train/unlearn/{metric}"
        assert tag in scalars, f"{tag} missing from TensorBoard; tags: {sorted(scalars)}"
        assert scalars[tag] == {s: as_float32(round(by_step[s][metric], 4)) for s in (2, 4)}
        eval_tag = f"eval/unlearn/{metric}"  # rewrite_logs: eval_unlearn/UA → eval/unlearn/UA
        assert scalars[eval_tag] == {4: as_float32(by_step[4][metric])}


def test_event_reader_rejects_a_torn_record(tmp_path):
    """The reader above is what the two tests trust: a flipped byte in a record must fail it, not drop tags."""
    writer = tensorboardX.SummaryWriter(log_dir=str(tmp_path))
    writer.add_scalar("train/routing/forget_batches", 3.0, 7)
    writer.close()
    assert read_scalars(tmp_path)["train/routing/forget_batches"] == {7: 3.0}
    (path,) = tmp_path.glob("events.out.tfevents.*")
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # inside the last event's payload
    path.write_bytes(bytes(raw))
    with pytest.raises(AssertionError, match="torn record"):
        read_scalars(tmp_path)
