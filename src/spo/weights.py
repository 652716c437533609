"""Reading a weights file (a scorer's, a released SPM's): a local file, a directory holding it,
or a hub repo's copy.

Only tensors are read: a safetensors file, or a torch checkpoint through
``torch.load(weights_only=True, map_location="cpu")`` (never pickled code).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .errors import ModelLoadError, local_path


def error_line(err: BaseException) -> str:
    """The first line of ``err``'s message for a one-line ModelLoadError; only the exception's type
    when the message is empty or suggests unsafe loading (``weights_only=False``)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}" if not first or "weights_only" in text else first


def resolve_file(weights: str, what: str, filename: str) -> Path:
    """The file ``weights`` names: a local file, a local directory holding ``filename``, or a hub
    id (``owner/name``) whose ``filename`` is downloaded (only then is the hub asked)."""
    path = local_path(weights, what, noun="file or directory")
    if path is None:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(weights, filename))
        except Exception as err:  # noqa: BLE001 - offline, missing repo or file, network: one message
            raise ModelLoadError(f"{what}: could not download {filename!r} from the hub repo {weights!r}: "
                                 f"{error_line(err)}") from None
    if path.is_dir():
        if not (path / filename).is_file():
            raise ModelLoadError(f"{what}: the directory {str(path)!r} holds no {filename!r}")
        path = path / filename
    return path


def is_hub_file_reference(ref: str) -> bool:
    """Whether ``ref`` reads as ``OWNER/REPO/PATH/IN/REPO`` (a file of a hub repo) rather than a
    local path: relative, not starting with ``.`` or ``~``, at least two ``/``, and nothing of
    that name on disk."""
    p = Path(ref).expanduser()
    return not (p.is_absolute() or ref.startswith((".", "~")) or p.exists()) and ref.count("/") >= 2


def resolve_weights_file(ref: str, what: str) -> Path:
    """The weights file ``ref`` names: a local file, or ``REPO_ID/FILE`` (``owner/name`` then the
    file's path inside that repo, e.g. ``SPO-Diffusion-Models/Step-Aware_Preference_Models/sd-v1-5_step-aware_preference_model.bin``)
    fetched through ``huggingface_hub`` (offline: from its cache). A missing file raises a
    :class:`ModelLoadError` that names ``what`` (the config field) and ``ref``, trying both
    readings."""
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    if p.exists():
        raise ModelLoadError(f"{what}: {str(p)!r} is a directory; expected a weights file")
    if not is_hub_file_reference(ref):
        raise ModelLoadError(f"{what}: no such file {str(p)!r} (a file of a hub repo is written REPO_ID/FILE)")
    owner, name, filename = ref.split("/", 2)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(f"{owner}/{name}", filename))
    except Exception as err:  # noqa: BLE001 - offline, missing repo or file, network: one message
        raise ModelLoadError(
            f"{what}: {ref!r} is no local file, nor could {filename!r} be fetched from the hub repo "
            f"{owner}/{name}: {error_line(err)}"
        ) from None


def read_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    """The tensors of ``path`` (safetensors or a torch checkpoint of plain tensors), on the CPU; a
    checkpoint dict holding ``'state_dict'`` (as open_clip's training saves) is unwrapped."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as err:
        raise ModelLoadError(f"{what}: cannot read {str(path)!r}: {err.strerror or err}") from None
    try:
        if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's own message suggests unsafe loading: not repeated
        raise ModelLoadError(
            f"{what}: {str(path)!r} is not a safetensors file nor a torch checkpoint of plain tensors "
            f"({type(err).__name__}); only tensors are read, never pickled code"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)} if isinstance(obj, Mapping) else {}
    if not tensors:
        raise ModelLoadError(f"{what}: {str(path)!r} holds no tensors (expected a state dict)")
    return tensors
