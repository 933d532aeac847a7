"""Everything that touches files: stamped artifacts, the path-safety rules, checkpoints, the Hub.

* ``paths`` — outputs never equal, contain or lie inside inputs; locks; locked temporaries; regular files only;
* ``artifacts`` — digest-verified, atomically written safetensors with an hfhooks stamp;
* ``errors`` — ``ArtifactError`` and ``CheckpointError``;
* ``safetensors`` — the format streamed: header parsing, ``pread`` tensor reads, the shard writer, kernel copies;
* ``checkpoints`` — ``Checkpoint``: lazy, bounded-memory reading of (sharded) checkpoints; layers from names;
* ``pipeline`` — ``prefetched``: the next tensor computed on a second thread while the current one is written;
* ``edit`` — ``edit_checkpoint``: atomic, streaming edits of a checkpoint (plan, write, carry files, publish);
* ``gguf`` — ``load_gguf``: GGUF files as plain, savable float models; ``smollm2_path``;
* ``hub`` — ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` for masks and diffs.
"""
