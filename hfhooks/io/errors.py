"""The errors of hfhooks' file formats, at the bottom of :mod:`hfhooks.io` so every reader can raise them.

:class:`ArtifactError` is a file that is not a valid hfhooks artifact; :class:`CheckpointError` (a subclass) a
checkpoint that cannot be read safely. Both are ``ValueError``: a bad file is a bad input value.
"""

from __future__ import annotations

__all__ = ["ArtifactError", "CheckpointError"]


class ArtifactError(ValueError):
    """A file that is not a valid hfhooks artifact of the expected kind (corrupt, truncated, foreign)."""


class CheckpointError(ArtifactError):
    """A checkpoint that cannot be read safely: missing, malformed header or index, pickled, inconsistent."""
