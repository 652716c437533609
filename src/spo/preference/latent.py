"""The latent reward model (LRM) of LPO: the diffusion model itself as a step-aware judge.

LPO (Zhang et al., "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level
Preference Optimization", NeurIPS 2025) replaces SPO's pixel-space step-aware preference model
with the diffusion model's own UNet, which already reads noisy latents at every t. For a noisy
latent x_t, its timestep t and a prompt c:

- the UNet's down blocks and mid block run on (x_t, t, c) (no up blocks, no output conv);
- *multi-scale*: each down block's last resnet output (before its downsampler) and the mid
  block's output are average-pooled over space and concatenated (SD-1.5: 320 + 640 + 1280 +
  1280 + 1280 = 4800 features; SDXL: 320 + 640 + 1280 + 1280 = 3520); without multi-scale the
  pooled mid output alone;
- with the LRM's own classifier-free guidance w (7.5 in the release) the unconditional pass on
  the empty prompt runs beside it and the pooled mid features become u + w (c - u) (the down
  features keep the conditional pass unless ``multi_scale_cfg``);
- a visual projection (Linear, no bias) maps them to the text space; the text side is the text
  encoder's pooled output through a text projection (SD-1.5 family: initialised from CLIP
  ViT-L/14's ``text_projection`` in the release) or, for SDXL, the second text encoder's own
  projected ``text_embeds``;
- score = exp(logit_scale) * cos(image features, text features), as a CLIP's.

The release (``lrm/lrm_15/trainer/models/sd15_preference_model.py``,
``sdxl_base_preference_model.py``) is read for these facts; this module is our own code on the
field's classes (diffusers' ``UNet2DConditionModel``, transformers' CLIP text models).

Saved as a directory: ``lrm_config.json``, ``lrm.safetensors`` (projections and logit scale) and
the trained components' own folders (``unet``, ``text_encoder``, ``tokenizer``, ``_2`` for SDXL).
The authors' released checkpoints (hub ``casiatao/LRM``) load as ``preference.checkpoint``: a
directory with ``unet/``, ``text_encoder/`` (and ``text_encoder_2/``) and ``state_dict.pt``
(``{'visual_projection': {...}, 'text_projection': {...}, 'logit_scale': ...}``, read with
``torch.load(weights_only=True)``), over the diffusion model of ``preference.pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ModelLoadError
from ..weights import parse_reference, resolve_reference, save_model_state

if TYPE_CHECKING:
    from ..config import SPOConfig

Family = Literal["sd", "sdxl"]
LRM_CONFIG = "lrm_config.json"
LRM_WEIGHTS = "lrm.safetensors"
RELEASE_STATE = "state_dict.pt"
#: CLIP's initial logit scale, log(1 / 0.07) (the release's ``logit_scale_init_value``)
LOGIT_SCALE_INIT = 2.6592


def unet_features(unet: Any, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                  added_cond_kwargs: dict[str, Tensor] | None = None) -> tuple[list[Tensor], Tensor]:
    """The UNet's forward up to its mid block: (each down block's last resnet output, the mid
    block's output). The same modules and order as ``UNet2DConditionModel.forward`` (no
    ControlNet / adapter residuals, no attention masks), stopping before the up blocks."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs or {})
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs or {})
    h = unet.conv_in(sample)
    stages: list[Tensor] = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, res = block(hidden_states=h, temb=emb)
        stages.append(res[len(block.resnets) - 1])  # before the downsampler, if any
    if getattr(unet.mid_block, "has_cross_attention", False):
        mid = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
    else:
        mid = unet.mid_block(h, emb)
    return stages, mid


def feature_width(unet: Any, multi_scale: bool) -> int:
    """Input width of the visual projection: the pooled stages plus the mid block, or the mid alone."""
    channels = list(unet.config.block_out_channels)
    return sum(channels) + channels[-1] if multi_scale else channels[-1]


class LatentRewardModel(nn.Module):
    """Scores (noisy latents, prompts, timesteps) with a diffusion model's down and mid blocks.

    Args:
        unet: a ``UNet2DConditionModel`` (trained with the LRM).
        text_encoders / tokenizers: one CLIP text model (SD-1.5 family, the toy model) or two
            (SDXL: ``CLIPTextModel`` and ``CLIPTextModelWithProjection``).
        family: ``"sd"`` or ``"sdxl"`` (how the text side conditions the UNet).
        multi_scale / guidance_scale / multi_scale_cfg: the features (module docstring).
        projection_dim: width of the shared space; default the text encoder's hidden size (SD-1.5
            family) or the second encoder's projection width (SDXL: no text projection).
        resolution: image side the SDXL size conditioning states (``time_ids``); default
            the UNet's ``sample_size`` x 8 (the release: ``sample_size`` x the VAE's factor,
            which :meth:`from_pretrained` reads from the model's ``vae/config.json``).
    """

    #: the pool sampler hands this scorer the candidates' latents, not decoded images
    takes_latents: ClassVar[bool] = True

    def __init__(
        self,
        unet: Any,
        text_encoders: Sequence[Any],
        tokenizers: Sequence[Any],
        *,
        family: Family = "sd",
        multi_scale: bool = True,
        guidance_scale: float = 7.5,
        multi_scale_cfg: bool = False,
        projection_dim: int | None = None,
        logit_scale_init: float = LOGIT_SCALE_INIT,
        resolution: int | None = None,
    ) -> None:
        super().__init__()
        if family not in ("sd", "sdxl"):
            raise ValueError(f"unknown LRM family {family!r}; expected 'sd' or 'sdxl'")
        if len(text_encoders) != (2 if family == "sdxl" else 1) or len(tokenizers) != len(text_encoders):
            raise ValueError(f"an LRM of family {family!r} needs {2 if family == 'sdxl' else 1} text encoder(s) and tokenizer(s)")
        self.family: Family = family
        self.unet = unet
        self.text_encoder = text_encoders[0]
        self.text_encoder_2 = text_encoders[1] if family == "sdxl" else None
        self.tokenizers = list(tokenizers)
        self.multi_scale, self.multi_scale_cfg = multi_scale, multi_scale_cfg
        self.guidance_scale = float(guidance_scale)
        self.resolution = int(resolution or unet.config.sample_size * 8)
        if family == "sdxl":
            text_width = int(self.text_encoder_2.config.projection_dim)
            projection_dim = projection_dim or text_width
            if projection_dim != text_width:
                raise ValueError(f"an SDXL LRM scores in the text_embeds space ({text_width}), not {projection_dim}")
            self.text_projection: nn.Linear | None = None
        else:
            hidden = int(self.text_encoder.config.hidden_size)
            projection_dim = projection_dim or hidden
            self.text_projection = nn.Linear(hidden, projection_dim, bias=False)
            nn.init.normal_(self.text_projection.weight, mean=0.0, std=0.02)
        self.projection_dim = int(projection_dim)
        self.visual_projection = nn.Linear(feature_width(unet, multi_scale), self.projection_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, mean=0.0, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def clear_cache(self) -> None:
        """Nothing is cached (the text side runs with the latents); kept for the trainer's call."""

    def settings(self) -> dict[str, Any]:
        return {"family": self.family, "multi_scale": self.multi_scale, "guidance_scale": self.guidance_scale,
                "multi_scale_cfg": self.multi_scale_cfg, "projection_dim": self.projection_dim,
                "resolution": self.resolution}

    # ------------------------------------------------------------------ text
    def _ids(self, tokenizer: Any, texts: Sequence[str]) -> Tensor:
        return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode_text(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor | None, Tensor]:
        """(hidden states, pooled embeddings for SDXL's added conditioning, text features): the
        first two for the prompts with the empty prompt's rows appended under guidance, the
        features for the prompts only; ``pooled`` is ``None`` for the SD-1.5 family."""
        texts = list(prompts) + ([""] * len(prompts) if self.guided else [])
        if self.family == "sd":
            out = self.text_encoder(self._ids(self.tokenizers[0], texts), return_dict=False)
            hidden, pooled = out[0], out[1]
            assert self.text_projection is not None
            features = self.text_projection(pooled[: len(prompts)].to(self.text_projection.weight.dtype))
            return hidden, None, features
        first = self.text_encoder(self._ids(self.tokenizers[0], texts), output_hidden_states=True)
        second = self.text_encoder_2(self._ids(self.tokenizers[1], texts), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second[0]  # text_embeds: the projected pooled output of the second encoder
        return hidden, pooled, pooled[: len(prompts)]

    def time_ids(self, rows: int, dtype: torch.dtype, side: int | None = None) -> Tensor:
        """SDXL's size conditioning (H, W, 0, 0, H, W) at ``side`` (default ``resolution``)."""
        side = int(side or self.resolution)
        return torch.tensor([[side, side, 0, 0, side, side]] * rows, dtype=dtype, device=self.device)

    # ------------------------------------------------------------------ image side
    def image_features(self, latents: Tensor, timesteps: Tensor, hidden: Tensor, pooled: Tensor | None) -> Tensor:
        """Visual features of ``latents`` (N, C, h, w) at ``timesteps`` (N,) given the text side of
        :meth:`encode_text` (conditional rows, then the empty prompt's under guidance)."""
        n = latents.shape[0]
        dtype = self.unet.conv_in.weight.dtype
        x, t = latents.to(dtype), torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(n)
        if self.guided:
            x, t = torch.cat([x, x]), torch.cat([t, t])
        added = None
        if self.family == "sdxl":
            assert pooled is not None
            # the image side these latents decode to (the release resizes every image to the native
            # size, where this is ``resolution``; a run at another model.resolution states its own)
            factor = max(1, self.resolution // int(self.unet.config.sample_size))
            added = {"text_embeds": pooled.to(dtype), "time_ids": self.time_ids(x.shape[0], dtype, latents.shape[-1] * factor)}
        stages, mid = unet_features(self.unet, x, t, hidden.to(dtype), added)
        pooled_stages = [s.float().mean(dim=(2, 3)) for s in stages]
        pooled_mid = mid.float().mean(dim=(2, 3))
        if self.guided:
            w = self.guidance_scale
            cond, uncond = pooled_mid[:n], pooled_mid[n:]
            pooled_mid = uncond + w * (cond - uncond)
            if self.multi_scale_cfg:
                pooled_stages = [s[n:] + w * (s[:n] - s[n:]) for s in pooled_stages]
            else:
                pooled_stages = [s[:n] for s in pooled_stages]
        features = torch.cat([*pooled_stages, pooled_mid], dim=-1) if self.multi_scale else pooled_mid
        return self.visual_projection(features.to(self.visual_projection.weight.dtype))

    def embeddings(self, latents: Tensor, prompts: Sequence[str], timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised (image, text) features, one row per latent; ``prompts`` has one prompt per latent."""
        if len(prompts) != latents.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {latents.shape[0]} latents")
        hidden, pooled, text = self.encode_text(prompts)
        image = self.image_features(latents.to(self.device), timesteps, hidden, pooled)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return image.float(), text.float()

    def score(self, latents: Tensor, prompts: Sequence[str], timesteps: Tensor) -> Tensor:
        """exp(logit_scale) * cos(image, text), with gradients (training)."""
        image, text = self.embeddings(latents, prompts, timesteps)
        return self.logit_scale.float().exp() * (image * text).sum(dim=-1)

    def forward(self, latents: Tensor, prompts: Sequence[str], timesteps: Tensor, *, grad: bool = False) -> Tensor:
        """The pool sampler's scorer interface (no gradients); ``grad=True`` for training."""
        if grad:
            return self.score(latents, prompts, timesteps)
        with torch.no_grad():
            return self.score(latents, prompts, timesteps)

    # ------------------------------------------------------------------ loading and saving
    def components(self) -> dict[str, Any]:
        """The trained diffusers / transformers components by folder name."""
        parts = {"unet": self.unet, "text_encoder": self.text_encoder, "tokenizer": self.tokenizers[0]}
        if self.family == "sdxl":
            parts.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizers[1])
        return parts

    def head_state(self, state_dict: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The LRM's own weights (projections, logit scale); ``state_dict``: read from these
        (the whole LRM's, gathered) instead of the module."""
        names = ["visual_projection.weight", "logit_scale"] + (
            ["text_projection.weight"] if self.text_projection is not None else [])
        source = dict(self.named_parameters()) if state_dict is None else state_dict
        return {k: source[k].detach().contiguous().cpu() for k in names}

    def save(self, directory: str | Path, state_dict: Mapping[str, Tensor] | None = None) -> Path:
        """Write the LRM as a directory that ``preference.pretrained=DIR`` (with
        ``preference.kind=latent``) loads: its components' folders, ``lrm.safetensors`` and
        ``lrm_config.json``. ``state_dict``: the weights gathered whole (a sharded LRM holds only
        its shard)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, part in self.components().items():
            if state_dict is None or not isinstance(part, nn.Module):  # tokenizers
                part.save_pretrained(directory / name)
                continue
            own = {k.removeprefix(f"{name}."): v for k, v in state_dict.items() if k.startswith(f"{name}.")}
            if hasattr(part, "save_config"):  # a diffusers model: save_pretrained takes no state dict
                save_model_state(part, own, directory / name)
            else:
                part.save_pretrained(directory / name, state_dict=own)
        save_file(self.head_state(state_dict), str(directory / LRM_WEIGHTS))
        (directory / LRM_CONFIG).write_text(json.dumps(self.settings(), indent=2))
        return directory

    def load_head(self, state: Mapping[str, Tensor], what: str) -> None:
        """Load projections and logit scale (keys of :meth:`head_state`), checking every shape."""
        expected = set(self.head_state())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ModelLoadError(f"{what}: the LRM head does not fit: missing {missing}, unexpected {unexpected}")
        own = self.head_state()
        # the projections exactly as ours (a transposed matrix of the same size is wrong too); the
        # logit scale any one-element tensor (a float in the release's state_dict.pt reads as shape ())
        wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
                 if (state[k].numel() != 1 if k == "logit_scale" else tuple(state[k].shape) != tuple(own[k].shape))]
        if wrong:
            raise ModelLoadError(f"{what}: shape mismatch for {wrong[:4]}")
        with torch.no_grad():
            self.visual_projection.weight.copy_(state["visual_projection.weight"])
            self.logit_scale.copy_(state["logit_scale"].reshape(()))
            if self.text_projection is not None:
                self.text_projection.weight.copy_(state["text_projection.weight"])

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        checkpoint: str | None = None,
        text_projection: str | None = None,
        multi_scale: bool = True,
        guidance_scale: float = 7.5,
        multi_scale_cfg: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "LatentRewardModel":
        """An LRM from ``pretrained``: a saved LRM directory of ours (its settings win), or a
        diffusion model (diffusers pipeline directory, hub id, or the toy model's directory) whose
        UNet and text encoder(s) start the LRM, projections freshly initialised (the text
        projection from the CLIPModel ``text_projection`` names, as the release's from CLIP
        ViT-L/14). ``checkpoint``: the authors' released LRM (a directory in their layout, or one
        state-dict file of the whole model) loaded over it."""
        source = resolve_reference(pretrained, "preference.pretrained", "directory")
        if parse_reference(source).repo_id is not None and _hub_has(source, LRM_CONFIG):
            source = resolve_reference(source, "preference.pretrained", "directory", download=True)
        saved = (Path(source) / LRM_CONFIG).is_file()
        settings: dict[str, Any] = dict(multi_scale=multi_scale, guidance_scale=guidance_scale,
                                        multi_scale_cfg=multi_scale_cfg)
        if saved:
            meta = json.loads((Path(source) / LRM_CONFIG).read_text())
            settings = {k: meta[k] for k in ("multi_scale", "guidance_scale", "multi_scale_cfg", "projection_dim",
                                             "resolution") if k in meta}
        unet, encoders, tokenizers, family = _load_parts(source)
        settings.setdefault("resolution", int(unet.config.sample_size) * _vae_factor(source))
        lrm = cls(unet, encoders, tokenizers, family=family, **settings)
        if saved:
            lrm.load_head(load_file(str(Path(source) / LRM_WEIGHTS)), "preference.pretrained")
        elif text_projection is not None and lrm.text_projection is not None:
            lrm.init_text_projection(text_projection)
        if checkpoint is not None:
            lrm.load_release_checkpoint(checkpoint)
        return lrm.to(device=device or "cpu", dtype=dtype)

    def init_text_projection(self, clip: str) -> None:
        """Copy the ``text_projection`` of a CLIPModel (directory, hub id, or a weights file holding
        ``text_projection.weight``), as the release initialises it from CLIP ViT-L/14."""
        assert self.text_projection is not None
        path = Path(resolve_reference(clip, "preference.text_projection", "file", filename="model.safetensors"))
        state = _read_nested(path, "preference.text_projection")
        weight = state.get("text_projection.weight")
        if weight is None or tuple(weight.shape) != tuple(self.text_projection.weight.shape):
            raise ModelLoadError(f"preference.text_projection: {str(path)!r} holds no text_projection.weight of shape "
                                 f"{tuple(self.text_projection.weight.shape)}")
        with torch.no_grad():
            self.text_projection.weight.copy_(weight)

    def load_release_checkpoint(self, checkpoint: str) -> None:
        """The authors' released LRM over this one: a directory holding ``unet/``,
        ``text_encoder/`` (and ``text_encoder_2/`` for SDXL) and ``state_dict.pt``, as their
        ``save`` writes it; or one state-dict file of the whole model (keys ``unet.``,
        ``text_encoder.``, ``visual_projection.weight``, ...), which their SDXL ``load`` also takes."""
        what = "preference.checkpoint"
        path = Path(resolve_reference(checkpoint, what, "directory", download=True))
        if path.is_file():
            state = _read_nested(path, what)
            self._load_flat(state, what)
            return
        if not (path / RELEASE_STATE).is_file():
            raise ModelLoadError(f"{what}: {str(path)!r} is not a released LRM directory: it holds no {RELEASE_STATE}")
        from diffusers import UNet2DConditionModel

        dtype = self.unet.conv_in.weight.dtype
        if (path / "unet").is_dir():
            self.unet = _from_pretrained(UNet2DConditionModel, str(path / "unet"), what).to(self.device, dtype)
        for name in ("text_encoder", "text_encoder_2"):
            current = getattr(self, name)
            if current is not None and (path / name).is_dir():
                setattr(self, name, _from_pretrained(type(current), str(path / name), what).to(self.device, dtype))
        self.requires_grad_(False)
        self.load_head(_read_nested(path / RELEASE_STATE, what), what)

    def _load_flat(self, state: dict[str, Tensor], what: str) -> None:
        head = {k: v for k, v in state.items() if k in self.head_state()}
        # the release's preference models hold the pipeline's VAE as ``self.vae`` (never used to
        # score): a whole-model state dict of theirs carries its weights, which their own
        # ``load_state_dict(ckpt, strict=False)`` takes in and ours passes over
        rest = {k: v for k, v in state.items() if k not in head and not k.startswith("vae.")}
        own = self.state_dict()
        unexpected = sorted(set(rest) - set(own))
        if unexpected:
            raise ModelLoadError(f"{what}: {len(unexpected)} keys do not fit this LRM: {unexpected[:6]}")
        wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in rest.items()
                 if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise ModelLoadError(f"{what}: shape mismatch for {wrong[:4]}")
        self.load_state_dict(rest, strict=False)
        self.load_head({**self.head_state(), **head}, what)


def _from_pretrained(cls: Any, path: str, what: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{what}: could not load {cls.__name__} from {path!r}: {str(err).splitlines()[0]}") from None


def _load_parts(source: str) -> tuple[Any, list[Any], list[Any], Family]:
    """UNet, text encoder(s) and tokenizer(s) of a diffusion model (subfolders ``unet``,
    ``text_encoder``, ``tokenizer``, and ``_2`` for SDXL); the family from ``text_encoder_2``."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    what = "preference.pretrained"
    local = Path(source)
    if local.is_dir():
        if not (local / "unet").is_dir():
            sd3 = " (an SD3 pipeline: its transformer has no down and mid blocks to pool, and LPO's release has no " \
                  "LRM for it)" if (local / "transformer").is_dir() else ""
            raise ModelLoadError(f"{what}: {source!r} holds no unet/ folder{sd3}: a latent reward model is built from "
                                 "a diffusion model's UNet (a diffusers pipeline directory or hub id) or loaded from a saved LRM")
        sdxl = (local / "text_encoder_2").is_dir()
    else:
        sdxl = _hub_has(source, "text_encoder_2/config.json")
    unet = _from_pretrained(UNet2DConditionModel, source, what, subfolder="unet")
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "mid_block"):
        raise ModelLoadError(f"{what}: {source!r} has no UNet with down and mid blocks")
    encoders = [_from_pretrained(CLIPTextModel, source, what, subfolder="text_encoder")]
    tokenizers = [_from_pretrained(AutoTokenizer, source, what, subfolder="tokenizer")]
    if sdxl:
        encoders.append(_from_pretrained(CLIPTextModelWithProjection, source, what, subfolder="text_encoder_2"))
        tokenizers.append(_from_pretrained(AutoTokenizer, source, what, subfolder="tokenizer_2"))
    return unet, encoders, tokenizers, "sdxl" if sdxl else "sd"


def _vae_factor(source: str) -> int:
    """2 ** (VAE levels - 1) of the model at ``source`` (8 for SD's VAE; 8 when it is not local)."""
    config = Path(source) / "vae" / "config.json"
    if not config.is_file():
        return 8
    return 2 ** (len(json.loads(config.read_text()).get("block_out_channels", [0, 0, 0, 0])) - 1)


def _hub_has(repo_id: str, filename: str) -> bool:
    try:
        resolve_reference(f"{repo_id}/{filename}", "preference.pretrained", "file")
    except ModelLoadError:
        return False
    return True


def _read_nested(path: Path, what: str) -> dict[str, Tensor]:
    """Tensors of a safetensors file or a torch file of (nested dicts of) tensors and numbers,
    flattened to dotted keys (``torch.load(weights_only=True)``: never pickled code)."""
    try:
        if path.suffix == ".safetensors":
            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - one line, naming the file
        raise ModelLoadError(f"{what}: {str(path)!r} is not a safetensors file nor a torch file of plain tensors "
                             f"({type(err).__name__}); only tensors are read, never pickled code") from None
    out: dict[str, Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Tensor):
            out[prefix] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = torch.tensor(float(value))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", obj)
    if not out:
        raise ModelLoadError(f"{what}: {str(path)!r} holds no tensors")
    return out


def load_latent_reward_model(config: "SPOConfig", device: torch.device | str | None = None, *,
                             with_checkpoint: bool = True, dtype: torch.dtype | None = None) -> LatentRewardModel:
    """The LRM the ``preference`` section names (``preference.kind=latent``)."""
    from ..backbones import resolve_dtype

    p = config.preference
    return LatentRewardModel.from_pretrained(
        p.pretrained, checkpoint=p.checkpoint if with_checkpoint else None, text_projection=p.text_projection,
        multi_scale=p.multi_scale, guidance_scale=p.guidance_scale, multi_scale_cfg=p.multi_scale_cfg,
        device=device, dtype=dtype or resolve_dtype(p.dtype),
    )

