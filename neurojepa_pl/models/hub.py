"""Hugging Face Hub sources for :func:`neurojepa_pl.models.load_backbone`: ``"org/name"`` -> a local snapshot folder.

The download, the cache layout (``models--org--name/snapshots/<commit>/``, ``refs/<branch>``), revision pinning,
authentication and offline mode are ``huggingface_hub``'s (``snapshot_download``); this module only decides when a
source is a repository id and turns the library's failures into one error that names the repository, the revision
and the mode.

Environment, read at call time (``huggingface_hub`` reads its own constants once, at import, so a process that sets
them later, e.g. a notebook or a test, is still honoured): ``HF_HUB_OFFLINE=1`` (only the local cache is read),
``HF_HUB_CACHE`` / ``HF_HOME`` (where the cache is), ``HF_TOKEN`` (gated or private repositories; also the token saved
by ``hf auth login``).

Why not ``huggingface_hub.PyTorchModelHubMixin``: the mixin saves the module's own ``state_dict`` keys and its init
kwargs, and loads with ``load_state_dict``. Our folders keep the reference key layout (per-expert tensors) so that the
authors' loader reads them too, hold up to three networks (``--full``), and must load through our strict key check
(errors that name keys and shapes), none of which the mixin's ``from_pretrained`` offers. The Hub is therefore used
as storage: ``snapshot_download`` here, ``ModelCard`` for the README (``neurojepa_pl.tools.export``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from neurojepa_pl.errors import UserFileNotFoundError

__all__ = ["HUB_FILES", "is_hub_id", "hub_snapshot"]

HUB_FILES = ("config.json", "model.safetensors", "README.md")
"""The files of an exported folder fetched from a repository (nothing else is downloaded)."""

# huggingface_hub's repository-id rule: one "/", names of letters, digits, "-", "_", "." (no leading "." or "-").
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = ("1", "ON", "YES", "TRUE")


def is_hub_id(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` should be read from the Hub: shaped ``org/name`` and not an existing local path."""
    text = os.fspath(source)
    return bool(_REPO_ID.match(text)) and not Path(text).exists()


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's default (~/.cache/huggingface/hub)


def hub_snapshot(
    repo_id: str, revision: str | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The local folder of ``repo_id`` at ``revision``: downloaded (only :data:`HUB_FILES`) or from the cache.

    Args:
        repo_id: ``"org/name"``.
        revision: branch, tag or commit hash (None: ``main``). Pin a commit hash for reproducible loading.
        token: None reads ``HF_TOKEN`` / the saved login; a string is used as the token; False sends none.
        cache_dir: the Hub cache (None: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default).

    Returns:
        The snapshot folder (``.../models--org--name/snapshots/<commit>``).

    Raises:
        UserFileNotFoundError: if the repository, the revision or (offline) the cached snapshot is not found, naming
            all three and the mode.
    """
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir if cache_dir is not None else _cache_dir(),
            local_files_only=offline,
            allow_patterns=list(HUB_FILES),
            library_name="neurojepa_pl",
        )
    except Exception as err:  # huggingface_hub raises a family of HTTP / cache / offline errors; all mean "not here"
        where = "the local Hub cache only (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserFileNotFoundError(
            f"{repo_id!r} is not a local path, and the Hub repository {repo_id} at revision {revision or 'main'} "
            f"could not be read from {where}: {type(err).__name__}: {reason}",
            "check the path or the repository id and revision; for a gated repository set HF_TOKEN; offline, "
            "download it first (hf download <repo>) or pass the local folder.",
        ) from err
    return Path(str(folder))
