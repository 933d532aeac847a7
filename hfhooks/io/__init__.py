"""Everything that touches files: stamped artifacts, the path-safety rules, checkpoints, the Hub.

* ``paths`` — outputs never equal, contain or lie inside inputs; locks; locked temporaries; regular files only;
* ``artifacts`` — digest-verified, atomically written safetensors with an hfhooks stamp;
* ``checkpoints`` — lazy, streamed, bounded-memory reading and atomic editing of (sharded) checkpoints;
* ``hub`` — ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` for masks and diffs.
"""
