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
