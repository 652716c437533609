"""Weights references, resolved by one rule, and weights files read as tensors only.

Every option that names weights (``model.pretrained``, ``model.vae``, ``preference.pretrained`` /
``processor`` / ``checkpoint`` / ``decoder``, ``spm.relabel``, ``spo eval``'s pipelines and LoRA
files, each ``--scorer NAME=WEIGHTS[,OPTION=VALUE]`` and its options) takes the same three forms,
read by :func:`parse_reference` and resolved by :func:`resolve_reference`:

* a local path (it exists, or is absolute, or starts with ``.`` or ``~``), used as it is; a
  missing one is an error naming the option;
* a hub repo id, ``owner/name`` (or a bare legacy id such as ``bert-base-uncased``): the repo —
  handed to ``from_pretrained``, which takes hub ids itself, or fetched with ``snapshot_download``
  where a local directory is needed; where one file is wanted, the option's file of that repo
  (e.g. HPSv2's ``HPS_v2_compressed.pt``) through ``hf_hub_download``;
* ``REPO_ID/PATH``, a file (or folder) inside a hub repo:
  ``hf_hub_download(REPO_ID, PATH)`` (a folder: ``snapshot_download`` of that folder).

Offline (``HF_HUB_OFFLINE=1``) the hub client answers from its cache; what is not there fails with
one line ``OPTION: ...`` naming the repo and the file. ``toy:NAME`` references
(:mod:`spo.builtin`) resolve to the shipped files first.

Only tensors are read: a safetensors file, or a torch checkpoint through
``torch.load(weights_only=True, map_location="cpu")`` (never pickled code).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .builtin import resolve_weights
from .errors import ModelLoadError

Want = Literal["file", "directory"]
#: one part of a hub repo id (an owner, a repo name)
_HUB_PART = re.compile(r"[A-Za-z0-9][\w.-]*")


def error_line(err: BaseException) -> str:
    """The first line of ``err``'s message for a one-line ModelLoadError; only the exception's type
    when the message is empty or suggests unsafe loading (``weights_only=False``)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}" if not first or "weights_only" in text else first


@dataclass(frozen=True)
class Reference:
    """How a weights reference reads: ``local`` (a path), else ``repo_id`` with ``path_in_repo``
    (``None``: the repo itself; else a file or folder inside it)."""

    text: str
    local: Path | None = None
    repo_id: str | None = None
    path_in_repo: str | None = None


def parse_reference(ref: str | Path) -> Reference:
    """Read ``ref`` without touching the network: a local path when something of that name exists,
    when it is absolute or starts with ``.`` or ``~``, or when it is no hub form; else ``owner/name``
    (or a bare legacy id: one part) is a hub repo and ``owner/name/PATH`` a file or folder in one."""
    text = str(ref)
    p = Path(text).expanduser()
    parts = text.split("/")
    hub = (not (p.is_absolute() or text.startswith((".", "~")) or p.exists())
           and all(_HUB_PART.fullmatch(part) for part in parts[:2])
           and all(part not in ("", ".", "..") for part in parts) and "\\" not in text)
    if not hub:
        return Reference(text, local=p)
    if len(parts) <= 2:
        return Reference(text, repo_id=text)
    return Reference(text, repo_id="/".join(parts[:2]), path_in_repo="/".join(parts[2:]))


def _hub_failure(err: BaseException) -> str:
    """Why the hub client gave nothing, as the tail of a one-line message."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(err, LocalEntryNotFoundError):
        import huggingface_hub

        offline = getattr(huggingface_hub, "is_offline_mode", lambda: False)()
        return "not in the local hub cache" + (" and HF_HUB_OFFLINE is set" if offline else
                                               ", and the hub could not be reached")
    return error_line(err)


def fetch_hub_file(repo_id: str, filename: str, what: str, *, lead: str | None = None, revision: str | None = None,
                   error: type[ModelLoadError] = ModelLoadError) -> Path:
    """``hf_hub_download(repo_id, filename)`` (offline: from the hub cache), or one line
    ``WHAT: LEAD: why`` (``lead`` by default: could not fetch FILENAME from the hub repo REPO_ID)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, **({"revision": revision} if revision else {})))
    except Exception as err:  # noqa: BLE001 - offline and not cached, missing repo or file, network: one line
        lead = lead or f"could not fetch {filename!r} from the hub repo {repo_id!r}"
        raise error(f"{what}: {lead}: {_hub_failure(err)}") from None


def _fetch_folder(repo_id: str, folder: str | None, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    kwargs: dict[str, object] = {"revision": revision} if revision else {}
    if folder is not None:
        kwargs["allow_patterns"] = [f"{folder}/*", f"{folder}/**"]
    root = Path(snapshot_download(repo_id, **kwargs))
    return root / folder if folder is not None else root


def resolve_reference(ref: str | Path, what: str, want: Want = "file", *, filename: str | None = None,
                      download: bool = False, revision: str | None = None,
                      error: type[ModelLoadError] = ModelLoadError) -> str:
    """Where the weights ``ref`` names are, by the module's one rule; ``what`` (the option, e.g.
    ``preference.checkpoint``) leads every error, raised as ``error``.

    ``want="file"``: a local file path. A local file as it is; a local directory: its
    ``filename``; ``owner/name``: ``hf_hub_download(owner/name, filename)`` (without a
    ``filename`` the option needs ``REPO_ID/FILE``); ``owner/name/PATH``:
    ``hf_hub_download(owner/name, PATH)``.

    ``want="directory"``: a local path, or a hub id. A local path as it is; ``owner/name`` as it
    is (``from_pretrained`` fetches it) unless ``download`` (then ``snapshot_download``'s folder);
    ``owner/name/FOLDER``: ``snapshot_download`` of that folder, its local path.
    """
    text = resolve_weights(str(ref), what) if isinstance(ref, str) else str(ref)
    parsed = parse_reference(text)
    if parsed.local is not None:
        p = parsed.local
        if want == "directory":
            if not p.exists():
                raise error(f"{what}: no such directory {str(p)!r}")
            return str(p)
        if p.is_file():
            return str(p)
        if p.is_dir():
            if filename is None:
                raise error(f"{what}: {str(p)!r} is a directory; expected a weights file")
            if not (p / filename).is_file():
                raise error(f"{what}: the directory {str(p)!r} holds no {filename!r}")
            return str(p / filename)
        hint = "file or directory" if filename else "file"
        raise error(f"{what}: no such {hint} {str(p)!r} (a file of a hub repo is written REPO_ID/FILE)")
    repo, inside = parsed.repo_id, parsed.path_in_repo
    assert repo is not None
    if want == "directory":
        if inside is None and not download:
            return repo
        try:
            folder = _fetch_folder(repo, inside, revision)
        except Exception as err:  # noqa: BLE001 - offline and not cached, missing repo, network: one line
            raise error(f"{what}: {text!r} is no local path, nor could the hub repo {repo!r} give "
                        f"{'its folder ' + repr(inside) if inside else 'its files'}: {_hub_failure(err)}") from None
        if not folder.is_dir():
            raise error(f"{what}: the hub repo {repo!r} has no folder {inside!r}")
        return str(folder)
    if inside is None and filename is None:
        raise error(f"{what}: {text!r} names a hub repo, not a file in it: write REPO_ID/FILE")
    lead = None if inside is None else f"{text!r} is no local path, nor could {inside!r} be fetched from the hub repo {repo!r}"
    return str(fetch_hub_file(repo, inside or str(filename), what, lead=lead, revision=revision, error=error))


def check_reference(ref: str, what: str, noun: str = "file or directory",
                    error: type[ModelLoadError] = ModelLoadError) -> Reference:
    """How ``ref`` reads (``toy:`` resolved), failing early, before anything is written or
    fetched, on a local path that is missing (``WHAT: no such NOUN 'PATH'``); a hub reference is
    only read (it is fetched, and may fail, where it is loaded)."""
    parsed = parse_reference(resolve_weights(ref, what))
    if parsed.local is not None and not parsed.local.exists():
        raise error(f"{what}: no such {noun} {str(parsed.local)!r}")
    return parsed


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


def save_model_state(module: Any, state: dict[str, Any], directory: str | Path) -> None:
    """What diffusers' ``ModelMixin.save_pretrained`` writes (``config.json`` and
    ``diffusion_pytorch_model.safetensors``, split at 10 GB with its index as diffusers does),
    from ``state``: the model's whole weights, gathered from a sharded copy (an FSDP module holds
    only its shard, which ``save_pretrained``, taking no state dict, would write)."""
    from huggingface_hub import save_torch_state_dict

    missing = sorted(set(module.state_dict()) - set(state))
    if missing:
        raise ValueError(f"the gathered weights lack {len(missing)} of the model's entries, e.g. {missing[:3]}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module.save_config(directory)
    save_torch_state_dict(state, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="10GB", metadata={"format": "pt"})
