"""Masks and diffs on the Hugging Face Hub: ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub``.

A mask or diff "repository" is a folder (or Hub repo) holding one artifact file under a fixed name
(``mask.safetensors``, ``diff.safetensors``). Reading a repo id goes through ``huggingface_hub.hf_hub_download``,
so the Hub's cache, revisions, tokens and ``HF_HUB_OFFLINE=1`` behave exactly as they do for models; nothing
here talks to the network itself. The artifact is then read by the class's own verified ``load``.

We do not use ``huggingface_hub.ModelHubMixin``: it captures constructor arguments as a JSON config and writes
a model card, which fits ``nn.Module``s, not a tensor file with its own stamped metadata.

Example (a folder stands in for a repo id; any ``user/name`` on the Hub works the same way):

>>> import tempfile, torch
>>> from hfhooks import ParamMask
>>> mask = ParamMask({"w": torch.tensor([True, False, True])})
>>> folder = mask.save_pretrained(tempfile.mkdtemp())
>>> ParamMask.from_pretrained(folder) == mask
True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["HubError", "HubMixin"]


class HubError(RuntimeError):
    """A Hub download or upload failed; the message says what was asked for and what to do instead."""


class HubMixin:
    """Adds Hub-style loading and saving to a class with ``save(path, **kw)`` and ``load(path)``.

    Subclasses set ``hub_filename`` (the artifact's name inside a folder or repo).
    """

    hub_filename: ClassVar[str]

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **load_kwargs: Any,
    ) -> Any:
        """Load from a local file, a local folder holding ``hub_filename``, or a Hub repo id.

        A repo id is resolved with ``huggingface_hub.hf_hub_download`` (cache, ``revision``, ``token``;
        offline with ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` when the file is cached).
        """
        local = Path(path_or_repo_id)
        if local.is_file():
            return cls.load(local, **load_kwargs)  # type: ignore[attr-defined]
        if local.is_dir():
            file = local / cls.hub_filename
            if not file.is_file():
                raise FileNotFoundError(
                    f"{local} is a folder without {cls.hub_filename}; save one there with save_pretrained({str(local)!r})."
                )
            return cls.load(file, **load_kwargs)  # type: ignore[attr-defined]
        return cls.load(  # type: ignore[attr-defined]
            download(str(path_or_repo_id), cls.hub_filename, revision, cache_dir, token, local_files_only),
            **load_kwargs,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **save_kwargs: Any) -> Path:
        """Write ``save_directory/<hub_filename>`` (atomically, with the class's usual stamp); returns the folder."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / self.hub_filename, **save_kwargs)  # type: ignore[attr-defined]
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        **save_kwargs: Any,
    ) -> str:
        """Create ``repo_id`` if needed and upload the artifact as ``hub_filename``; returns the commit URL.

        Offline (``HF_HUB_OFFLINE=1``, no network) this raises :class:`HubError` before writing anything remote;
        ``save_pretrained(dir)`` and a later upload of ``dir`` do the same in two steps.
        """
        import tempfile

        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            raise HubError(
                f"Cannot push to {repo_id!r}: HF_HUB_OFFLINE is set. Use save_pretrained(dir) now and upload dir "
                "later (huggingface_hub.upload_folder or `hf upload`)."
            )
        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / self.hub_filename
            self.save(path, **save_kwargs)  # type: ignore[attr-defined]
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                info = api.upload_file(
                    path_or_fileobj=str(path),
                    path_in_repo=self.hub_filename,
                    repo_id=repo_id,
                    revision=revision,
                    commit_message=commit_message or f"Upload {self.hub_filename} with hfhooks",
                )
            except Exception as e:  # network, auth and HTTP errors all mean the same thing to the caller
                raise HubError(
                    f"Could not push {self.hub_filename} to {repo_id!r}: {type(e).__name__}: {e}. Check the network "
                    "and your token (`hf auth login`), or save_pretrained(dir) and upload it later."
                ) from e
        return str(getattr(info, "commit_url", info))


def download(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """``hf_hub_download`` with errors that say whether the name was taken as a path or a repo id."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                library_name="hfhooks",
            )
        )
    except Exception as e:  # not found, offline without a cached copy, invalid repo id, HTTP errors
        raise HubError(
            f"{repo_id!r} is neither a local file or folder nor a Hub repo holding {filename} that could be "
            f"downloaded ({type(e).__name__}: {e}). Offline, the file must already be in the Hub cache "
            "(HF_HUB_OFFLINE=1 reads it from there)."
        ) from e
