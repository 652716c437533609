"""One interface over text-to-image diffusion models: encode, predict with CFG, decode, LoRA.

A ``Backbone`` owns a diffusers pipeline's components. The policy is the UNet (with LoRA adapters
on, or fully trainable); the *reference* model is the same UNet with adapters disabled (no copy),
or a frozen copy under full fine-tuning. Everything SPO needs from a model goes through
``encode_prompts``, ``predict`` and ``decode``, so sampling and objectives know no model class.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import LoRAConfig, ModelConfig
from ..diffusion import Schedule, schedule_from_config
from ..errors import ModelLoadError
from ..weights import resolve_reference
from .lora import attach_lora, lora_state_dict

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BackboneLoadError(ModelLoadError):
    """A diffusion pipeline could not be loaded from the given directory or hub id."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; an unavailable device is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"model.device: {device!r} is not a torch device ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device: {device!r} requested but CUDA is not available here")
    return resolved


@dataclass
class Conditioning:
    """Text conditioning of a batch of prompts, with its unconditional (negative) counterpart.

    Every field is a tensor whose first dimension is the batch (or ``None`` when the backbone does
    not use it), so a ``Conditioning`` can be indexed, repeated and concatenated like a tensor.
    ``prompt_embeds``: token embeddings (B, L, D) for the UNet's cross-attention. ``pooled``:
    pooled text embedding (SDXL). ``time_ids``: SDXL micro-conditioning (original size, crop,
    target size). ``negative_*``: the same for the negative prompt (classifier-free guidance).
    """

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None
    pooled: Tensor | None = None
    negative_pooled: Tensor | None = None
    time_ids: Tensor | None = None
    negative_time_ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.prompt_embeds.shape[0])

    def _map(self, fn: Any) -> "Conditioning":
        return Conditioning(
            **{
                f.name: (None if (v := getattr(self, f.name)) is None else fn(v))
                for f in dataclasses.fields(self)
            }
        )

    def index(self, rows: Tensor | Sequence[int] | slice) -> "Conditioning":
        """Rows ``rows`` of every tensor."""
        if isinstance(rows, slice):
            return self._map(lambda v: v[rows])
        idx = torch.as_tensor(rows, dtype=torch.long)
        return self._map(lambda v: v.index_select(0, idx.to(v.device)))

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        """Each row repeated ``repeats`` times in place (for k candidates of a pool)."""
        return self._map(lambda v: v.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch."""
        if not items:
            raise ValueError("cannot concatenate an empty list of conditionings")
        out = {}
        for f in dataclasses.fields(Conditioning):
            values = [getattr(c, f.name) for c in items]
            out[f.name] = None if values[0] is None else torch.cat(values, dim=0)
        return Conditioning(**out)

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None


def check_device_request(device: str | None, dtype: str | torch.dtype, mixed_precision: str = "no",
                         mixed_precision_key: str = "train.mixed_precision") -> None:
    """Refuse what cannot be honoured, before anything loads: a CUDA device on a machine without
    CUDA, float16 weights on the CPU (``device`` None = CUDA when available, else the CPU), fp16
    autocast on the CPU (accelerate would quietly train in float32)."""
    if device is not None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError) as err:
            raise ModelLoadError(f"model.device: {device!r} is not a torch device ({err})") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"model.device: {device!r} was asked for, but CUDA is not available on this "
                                 f"machine (torch {torch.__version__}); use model.device=cpu or leave it null")
    on_cpu = (torch.device(device).type == "cpu") if device is not None else not torch.cuda.is_available()
    if on_cpu and resolve_dtype(dtype) == torch.float16:
        raise ModelLoadError("model.dtype: float16 is not supported on the CPU; use float32 or bfloat16")
    if on_cpu and mixed_precision == "fp16":
        raise ModelLoadError(f"{mixed_precision_key}: 'fp16' autocast is not available on the CPU (accelerate would "
                             "silently train in float32); use 'no' or 'bf16'")


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` in diffusers >= 0.42, ``torch_dtype`` before."""
    import diffusers
    from packaging.version import Version

    name = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
    return {name: dtype}


def check_model_path(path: str, what: str = "model.pretrained", revision: str | None = None) -> str:
    """What to load the pipeline ``path`` names from (:func:`spo.weights.resolve_reference`): a
    local directory, a hub id (``owner/name``, left to ``from_pretrained``), or the local folder
    of ``owner/name/FOLDER``. Fails early and clearly on a local path that does not exist or is
    not a diffusers folder."""
    resolved = resolve_reference(path, what, "directory", revision=revision, error=BackboneLoadError)
    p = Path(resolved)
    if p.is_dir() and not (p / "model_index.json").exists():
        raise BackboneLoadError(
            f"{what}: {str(p)!r} is not a diffusers pipeline directory (no model_index.json); "
            "save one with `pipeline.save_pretrained(DIR)`"
        )
    return resolved


def _load_vae(path: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    path = resolve_reference(path, "model.vae", "directory", error=BackboneLoadError)
    try:
        return AutoencoderKL.from_pretrained(path, **dtype_kwarg(dtype))
    except (OSError, ValueError) as err:
        raise BackboneLoadError(f"model.vae: could not load an AutoencoderKL from {path!r}: {err}") from err


def _load_score_decoder(path: str, dtype: torch.dtype) -> Any:
    """An ``AutoencoderTiny`` (TAESD's architecture) from a local directory or hub id."""
    import json

    from diffusers import AutoencoderTiny

    path = resolve_reference(path, "preference.decoder", "directory", error=BackboneLoadError)
    p = Path(path)
    config_file = p / "config.json" if p.is_dir() else None
    if config_file is not None and config_file.exists():
        try:
            class_name = json.loads(config_file.read_text()).get("_class_name")
        except (OSError, ValueError):
            class_name = None
        if class_name not in (None, "AutoencoderTiny"):
            raise BackboneLoadError(
                f"preference.decoder: {str(p)!r} holds a {class_name}, not an AutoencoderTiny "
                "(TAESD: madebyollin/taesd for SD-1.5, madebyollin/taesdxl for SDXL)"
            )
    try:
        return AutoencoderTiny.from_pretrained(path, **dtype_kwarg(dtype))
    except (OSError, ValueError) as err:
        raise BackboneLoadError(f"preference.decoder: could not load an AutoencoderTiny from {path!r}: {err}") from err


class Backbone(ABC):
    """Common machinery of the diffusers-based backbones (SD-1.5 style and SDXL).

    Subclasses load their pipeline and implement ``encode_prompts`` and ``_added_cond_kwargs``.

    Attributes:
        pipeline: the diffusers pipeline whose components this backbone uses (handy for
            ``save_lora_weights`` / ``load_lora_weights`` and for comparing against diffusers).
        unet, vae: the pipeline's UNet and VAE.
        score_decoder: an optional tiny decoder (``AutoencoderTiny``) that ``decode_for_scoring``
            uses instead of the VAE (see :meth:`load_score_decoder`); ``None``: the VAE.
        device, dtype: where and in which precision the frozen weights live.
    """

    #: the registered name (``model.backbone``): a module of this package named after it exposes
    #: the class as ``BACKBONE`` (or a plugin registers it, see :mod:`spo.registry`)
    kind: str = "base"
    #: ``build_tiny(seed=0, **options)`` -> a tiny random pipeline of this architecture (``spo
    #: tiny-pipeline KIND``, the tests); ``None`` where there is none
    build_tiny: ClassVar[Callable[..., Any] | None] = None
    #: name of the diffusers pipeline class this backbone loads, and extra from_pretrained kwargs
    pipeline_class: str = "DiffusionPipeline"
    #: is the model saved as a diffusers pipeline (``model_index.json``; ``spo eval`` can put a
    #: fine-tuned component or a LoRA file over it)? The toy model has its own format.
    diffusers_format: ClassVar[bool] = True
    pipeline_kwargs: dict[str, Any] = {}
    score_decoder: Any = None
    #: ``sampling.decode_tile``: pixel side of the tiles x0-hats are decoded in for scoring (None: whole)
    score_decode_tile: int | None = None

    @classmethod
    def from_config(cls, model: ModelConfig, negative_prompt: str | None = None,
                    components: dict[str, Any] | None = None) -> "Backbone":
        """The backbone ``model`` (the ``model`` section) describes, not yet set up for
        fine-tuning; ``components`` replace the pipeline's own (e.g. ``{"unet": a fine-tuned UNet}``)."""
        return cls.from_pretrained(
            model.pretrained, dtype=model.dtype, device=model.device, revision=model.revision,
            variant=model.variant, vae=model.vae, negative_prompt=negative_prompt,
            resolution=model.resolution, components=components,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = None,
        revision: str | None = None,
        variant: str | None = None,
        vae: str | None = None,
        negative_prompt: str | None = None,
        resolution: int | None = None,
        components: dict[str, Any] | None = None,
    ) -> "Backbone":
        """Load from a local diffusers directory or a hub id.

        ``vae`` replaces the pipeline's VAE (e.g. the fp16-safe ``madebyollin/sdxl-vae-fp16-fix``).
        ``components`` replace the pipeline's own, loaded already in ``dtype`` (``spo eval``: a
        fine-tuned pipeline's UNet in the base's pipeline), and the pipeline does not read those.
        A missing local path, or a directory that is not a diffusers pipeline, fails before any
        weight is read, with a message naming the path.
        """
        import diffusers

        torch_dtype = resolve_dtype(dtype)
        resolved_device = resolve_device(device)
        check_device_request(str(resolved_device), torch_dtype)
        pretrained = check_model_path(pretrained, "model.pretrained", revision)
        extra: dict[str, Any] = dict(cls.pipeline_kwargs)
        if vae is not None:
            extra["vae"] = _load_vae(vae, torch_dtype)
        extra.update(components or {})
        pipeline_cls = getattr(diffusers, cls.pipeline_class)
        try:
            for name, entry in pipeline_cls.load_config(pretrained, revision=revision).items():
                if isinstance(entry, (list, tuple)) and list(entry) == [None, None]:
                    extra.setdefault(name, None)  # saved without it (SD3 without T5): loaded without it
            pipeline = pipeline_cls.from_pretrained(
                pretrained, revision=revision, variant=variant, **dtype_kwarg(torch_dtype), **extra
            )
        except (OSError, ValueError) as err:
            raise BackboneLoadError(
                f"model.pretrained: could not load a {cls.pipeline_class} from {pretrained!r}: {err}\n"
                "Give a local diffusers directory (with model_index.json) or a hub id that is in "
                "the local cache or reachable from this machine."
                + (f" (read as a hub id: there is no local directory {str(Path(pretrained).resolve())!r})"
                   if not Path(pretrained).exists() else "")
            ) from err
        return cls(pipeline, device=resolved_device, dtype=torch_dtype, negative_prompt=negative_prompt, resolution=resolution)

    def __init__(
        self,
        pipeline: Any,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        negative_prompt: str | None = None,
        resolution: int | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.negative_prompt = negative_prompt
        self.unet = self._denoiser(pipeline)
        self.vae = getattr(pipeline, "vae", None)  # None: a pixel-space model, decode = identity
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.resolution = int(resolution or self.unet.config.sample_size * self.vae_scale_factor)
        self.reference_unet: torch.nn.Module | None = None
        #: the module ``predict`` calls for the policy (a DDP wrapper of ``unet`` in training)
        self.policy_forward: torch.nn.Module | None = None
        self._reference_active = False
        self._schedules: dict[int, Schedule] = {}
        #: (prompt, with_negative) -> its text-encoder outputs, one row (most recently used last)
        self._prompt_cache: OrderedDict[tuple[tuple[str, ...], bool], Conditioning] = OrderedDict()
        self.lora_settings: LoRAConfig | None = None
        self._adapter_name: str | None = None
        for module in self._frozen_modules():
            module.requires_grad_(False)
            module.eval()
        pipeline.to(self.device)
        if self.vae is not None and self.vae.dtype != self._vae_dtype():
            self.vae.to(dtype=self._vae_dtype())

    # ----------------------------------------------------------------------- loading helpers
    #: the prefix of the denoiser's keys in the pipeline's LoRA files (``unet``; SD3: ``transformer``)
    lora_prefix: str = "unet"

    def _denoiser(self, pipeline: Any) -> torch.nn.Module:
        """The network that predicts (noise, v or velocity): ``pipeline.unet``; SD3 overrides it
        with its transformer. The backbone calls it ``unet`` whatever it is."""
        return pipeline.unet

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in self.pipeline.components.values() if isinstance(m, torch.nn.Module)]

    #: keep a VAE that declares ``force_upcast`` in fp32 under fp16 (diffusers' SDXL pipeline does)
    upcast_vae_in_fp16: bool = False

    def _vae_dtype(self) -> torch.dtype:
        if self.upcast_vae_in_fp16 and self.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            return torch.float32  # the SDXL VAE overflows in fp16; the fp16-fix VAE does not need this
        return self.dtype

    # ----------------------------------------------------------------------- shapes and noise
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent at ``resolution``."""
        side = self.resolution // self.vae_scale_factor
        return (int(self.unet.config.in_channels), side, side)

    def schedule(self, num_inference_steps: int) -> Schedule:
        """The model's sampling schedule, built once per step count from its own scheduler: DDIM
        for noise-prediction models, the flow SDE for flow-matching ones."""
        if num_inference_steps not in self._schedules:
            self._schedules[num_inference_steps] = schedule_from_config(self.pipeline.scheduler, num_inference_steps)
        return self._schedules[num_inference_steps]

    def initial_latents(self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """x_T ~ N(0, I), drawn exactly as the diffusers pipelines draw it (a list: one generator per row)."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, *self.latent_shape)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    # ----------------------------------------------------------------------- conditioning
    #: how many calls' text-encoder outputs are kept (the text encoders are frozen, so a prompt list
    #: always encodes the same); 0 turns the cache off
    prompt_cache_size: int = 256
    #: images per denoiser call without gradients (``sampling.batch_size``; None: all at once)
    sampling_batch_size: int | None = None

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Refuse prompts this model cannot be conditioned on (a closed vocabulary); raises a
        ``ValueError`` naming the first one. Open-vocabulary backbones accept any text."""

    def encode_prompts(self, prompts: Sequence[str], *, with_negative: bool = True) -> Conditioning:
        """Encode prompts (and the negative prompt for classifier-free guidance).

        The distinct prompts of one call are encoded in one batch, as the diffusers pipelines
        encode theirs, and the result is cached per call (the ordered prompt list; least recently
        used dropped beyond :attr:`prompt_cache_size` lists): a batched text encoder's output can
        depend on the batch it ran in (SDXL's pooled embedding by ~4e-7), so what a call returns
        depends on that call's prompts only, never on which prompts an earlier call happened to
        cache, and a resumed run (empty cache) continues exactly."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        unique = list(dict.fromkeys(prompts))
        rows = [unique.index(p) for p in prompts]
        if self.prompt_cache_size <= 0:
            with self._text_encoders_on_device():
                encoded = self._encode_prompts(unique, with_negative=with_negative)
            return encoded if rows == list(range(len(unique))) else encoded.index(rows)
        cache = self._prompt_cache
        key = (tuple(prompts), with_negative)
        if key not in cache:
            with torch.no_grad(), self._text_encoders_on_device():
                encoded = self._encode_prompts(unique, with_negative=with_negative)
            cache[key] = encoded if rows == list(range(len(unique))) else encoded.index(rows)
        cache.move_to_end(key)
        while len(cache) > self.prompt_cache_size:
            cache.popitem(last=False)
        return cache[key]

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (``text_encoder``, ``_2``, ``_3`` where present)."""
        pipeline = getattr(self, "pipeline", None)
        found = [getattr(pipeline, f"text_encoder{s}", None) for s in ("", "_2", "_3")]
        return [m for m in found if isinstance(m, torch.nn.Module)]

    def offload_text_encoders(self) -> None:
        """Keep the text encoders in host memory between encodes (``model.offload_text_encoders``):
        each uncached :meth:`encode_prompts` moves them to the model's device, encodes there and
        moves them back, so the embeddings are the same as without (the same device computes
        them). Frees their memory on the accelerator for the rest of the round (SDXL's two: about
        1.6 GB in fp16; SD3's T5-XXL: about 9.5 GB) for one copy each way per encode."""
        self._offload_text = True
        for module in self.text_encoders():
            module.to("cpu")

    @contextlib.contextmanager
    def _text_encoders_on_device(self) -> Iterator[None]:
        if not getattr(self, "_offload_text", False):
            yield
            return
        for module in self.text_encoders():
            module.to(self.device)
        try:
            yield
        finally:
            for module in self.text_encoders():
                module.to("cpu")

    @abstractmethod
    def _encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> Conditioning:
        """Encode ``prompts`` (and the negative prompt) with the text encoders, uncached."""

    @abstractmethod
    def _added_cond_kwargs(self, cond: Conditioning, negative: bool) -> dict[str, Tensor] | None:
        """Extra UNet conditions (SDXL: pooled text embeddings and time ids)."""

    def _tokenize(self, tokenizer: Any, texts: Sequence[str], max_length: int | None = None) -> Tensor:
        return tokenizer(
            list(texts),
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    # ----------------------------------------------------------------------- the UNet
    def predict(
        self,
        x_t: Tensor,
        t: Tensor | int,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        *,
        reference: bool = False,
    ) -> Tensor:
        """The network's output at (x_t, t), with classifier-free guidance when scale > 1.

        Guidance runs conditional and unconditional rows through ONE batched UNet call:
        out = out_uncond + w * (out_cond - out_uncond). ``t`` is a scalar or one timestep per row.
        ``reference=True`` evaluates the frozen reference model (adapters off) instead of the policy.
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(batch) if t.ndim == 0 else t
        if len(cond) != batch:
            raise ValueError(f"conditioning has {len(cond)} rows but x_t has {batch}")
        size = self.sampling_batch_size
        use_reference = reference or self._reference_active
        # sampling (the policy, no gradients) in chunks; never the training passes (the reference's
        # has no gradients either, and its batch may differ between processes: one call each)
        if size is not None and batch > size and not torch.is_grad_enabled() and not use_reference:
            return torch.cat([self.predict(x_t[i : i + size], t[i : i + size], cond.index(slice(i, i + size)),
                                           guidance_scale, reference=reference) for i in range(0, batch, size)])
        guided = guidance_scale != 1.0
        if guided and not cond.has_negative:
            raise ValueError("guidance_scale != 1 needs a conditioning encoded with its negative prompt")
        if guided:
            x_in = torch.cat([x_t, x_t])
            t_in = torch.cat([t, t])
            hidden = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])
            neg, pos = self._added_cond_kwargs(cond, True), self._added_cond_kwargs(cond, False)
            added = None if pos is None else {k: torch.cat([neg[k], pos[k]]) for k in pos}
        else:
            x_in, t_in, hidden = x_t, t, cond.prompt_embeds
            added = self._added_cond_kwargs(cond, False)
        if use_reference and self.reference_unet is not None:
            unet = self.reference_unet
        elif use_reference:
            unet = self.unet  # adapters are disabled by reference_model()
        else:
            unet = self.policy_forward or self.unet
        dtype = self._unet_dtype(unet)
        context = self.reference_model() if (reference and not self._reference_active) else contextlib.nullcontext()
        with context:
            out = self._forward(unet, x_in.to(dtype), t_in, hidden.to(dtype),
                                None if added is None else {k: v.to(dtype) for k, v in added.items()})
        if guided:
            out_uncond, out_cond = out.float().chunk(2)  # combine in fp32: w amplifies rounding
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        return out

    def _forward(self, net: torch.nn.Module, x: Tensor, t: Tensor, hidden: Tensor,
                 added: dict[str, Tensor] | None) -> Tensor:
        """One call of the denoiser (a ``UNet2DConditionModel``'s signature)."""
        return net(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

    def _unet_dtype(self, unet: torch.nn.Module) -> torch.dtype:
        module = getattr(unet, "module", unet)  # through a DDP wrapper
        return module.conv_in.weight.dtype

    # ----------------------------------------------------------------------- the VAE
    def decode(self, x0: Tensor, *, clamp: bool = True) -> Tensor:
        """Decode latents (e.g. an x0-prediction) to images in [-1, 1], shape (B, 3, H, W);
        ``clamp=False`` returns the decoder's output as it is (the release's SPM resizes the
        unclamped image and clamps after)."""
        if self.vae is None:
            return x0.float().clamp(-1, 1) if clamp else x0.float()
        latents = x0.to(self.vae.dtype)
        scale, stats = self.vae.config.scaling_factor, self._latent_stats(latents)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0  # SD3's VAE: z = latents / scale + shift
        latents = latents * stats[1] / scale + stats[0] if stats else latents / scale + shift
        images = self.vae.decode(latents, return_dict=False)[0]
        return images.clamp(-1, 1) if clamp else images

    def load_score_decoder(self, path: str) -> Any:
        """Load the ``AutoencoderTiny`` (``preference.decoder``) that :meth:`decode_for_scoring` uses.

        Loaded in the backbone's dtype on its device and frozen. Its latent channels must be the
        UNet's and its upsampling the VAE's, so that it decodes the same latents to images of the
        same size; a missing local path or anything else that is no AutoencoderTiny fails with a
        :class:`BackboneLoadError` naming ``preference.decoder`` and the path.
        """
        if self.vae is None:
            raise BackboneLoadError(
                f"preference.decoder: the {self.kind} backbone works in pixel space and decodes nothing; "
                "leave preference.decoder unset"
            )
        decoder = _load_score_decoder(path, self.dtype)
        channels, unet_channels = int(decoder.config.latent_channels), int(self.latent_shape[0])
        if channels != unet_channels:
            raise BackboneLoadError(
                f"preference.decoder: {path!r} decodes {channels}-channel latents but the UNet of "
                f"model.pretrained works on {unet_channels}-channel latents"
            )
        blocks = len(decoder.config.decoder_block_out_channels)
        upsampling = int(decoder.config.upsampling_scaling_factor) ** (blocks - 1)
        if upsampling != self.vae_scale_factor:
            raise BackboneLoadError(
                f"preference.decoder: {path!r} upsamples latents {upsampling}x but the pipeline's VAE "
                f"{self.vae_scale_factor}x; the scored images would not have the VAE's size"
            )
        decoder.requires_grad_(False).eval().to(self.device)
        self.score_decoder = decoder
        return decoder

    def tile_score_decodes(self, tile: int | None) -> None:
        """Decode x0-hats for scoring in ``tile`` x ``tile`` pixel tiles (``sampling.decode_tile``):
        the VAE's own tiling (diffusers' ``tiled_decode``: a quarter's overlap, blended), switched
        on around :meth:`decode_for_scoring` only. ``None``: whole. Refused (``BackboneLoadError``)
        where it would not tile: no VAE, a VAE without diffusers' tiling, a size that is not a
        multiple of the VAE's factor or not smaller than the image."""
        if tile is None:
            self.score_decode_tile = None
            return
        what = f"sampling.decode_tile={tile}"
        if self.vae is None or not hasattr(self.vae, "tiled_decode") or not hasattr(self.vae, "tile_latent_min_size"):
            raise BackboneLoadError(f"{what}: the {self.kind} backbone has no VAE with diffusers' tiling; leave it unset")
        # diffusers steps through the latents by int(0.75 T) and keeps S - int(S / 4) pixels of each
        # tile (T, S: the tile in latents, in pixels): the two agree only when T is a multiple of 4,
        # else the decoded image comes out larger than the latents' (a 264 px tile on 512 px: 524 px)
        step = 4 * self.vae_scale_factor
        if tile % step or tile >= self.resolution:
            raise BackboneLoadError(f"{what}: must be a multiple of {step} (4 x the VAE's factor "
                                    f"{self.vae_scale_factor}: diffusers' tiles then meet exactly) and smaller than the "
                                    f"images ({self.resolution} px), or nothing would be tiled")
        self.score_decode_tile = tile

    @contextlib.contextmanager
    def _tiled_vae(self) -> Iterator[None]:
        tile = self.score_decode_tile
        if tile is None:
            yield
            return
        vae = self.vae
        saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, tile, tile // self.vae_scale_factor
        try:
            yield
        finally:
            vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved

    def decode_for_scoring(self, x0: Tensor, *, clamp: bool = True) -> Tensor:
        """Decode latents for the preference model only: with the tiny decoder when one is loaded
        (:meth:`load_score_decoder`), else exactly :meth:`decode`. Images in [-1, 1], (B, 3, H, W).

        The tiny decoder is fed the latents as diffusers' SD/SDXL pipelines feed a VAE set to an
        ``AutoencoderTiny`` (``vae.decode(latents / vae.config.scaling_factor)``; TAESD's factor is
        1.0: it takes the UNet's scaled latents as they are) and ``AutoencoderTiny.decode`` returns
        images in [-1, 1] (``DecoderTiny``: ``x.mul(2).sub(1)``), clamped here as :meth:`decode` does
        (``clamp=False``: as decoded).
        """
        decoder = self.score_decoder
        if decoder is None:
            with self._tiled_vae():  # sampling.decode_tile, if set
                images = self.decode(x0, clamp=clamp)
            expected = (x0.shape[-2] * self.vae_scale_factor, x0.shape[-1] * self.vae_scale_factor)
            if self.score_decode_tile is not None and tuple(images.shape[-2:]) != expected:
                raise RuntimeError(f"decoded {tuple(images.shape[-2:])} px images from latents of "
                                   f"{tuple(x0.shape[-2:])}: expected {expected} (sampling.decode_tile="
                                   f"{self.score_decode_tile})")
            return images
        latents = x0.to(decoder.dtype) / decoder.config.scaling_factor
        images = decoder.decode(latents, return_dict=False)[0]
        return images.clamp(-1, 1) if clamp else images

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Encode images in [-1, 1] to (scaled) latents, sampling the VAE posterior."""
        if self.vae is None:
            return images.to(self.device, self.dtype)
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        scale, stats = self.vae.config.scaling_factor, self._latent_stats(latents)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        scaled = (latents - stats[0]) * scale / stats[1] if stats else (latents - shift) * scale
        return scaled.to(self.dtype)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """The VAE's per-channel ``latents_mean`` / ``latents_std`` (shaped (1, C, 1, 1)), if declared."""
        mean = getattr(self.vae.config, "latents_mean", None)
        std = getattr(self.vae.config, "latents_std", None)
        if mean is None or std is None:
            return None
        as_tensor = lambda v: torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)  # noqa: E731
        return as_tensor(mean), as_tensor(std)

    # ----------------------------------------------------------------------- fine-tuning
    def attach_lora(self, settings: LoRAConfig, adapter_name: str = "spo") -> list[torch.nn.Parameter]:
        """Add a trainable LoRA adapter (kept in fp32) to the UNet; returns its parameters."""
        if self._adapter_name is not None or self.reference_unet is not None:
            raise RuntimeError("this backbone is already set up for fine-tuning")
        params = attach_lora(self.unet, settings, adapter_name=adapter_name)
        self.lora_settings = settings
        self._adapter_name = adapter_name
        return params

    def enable_full_finetuning(self) -> list[torch.nn.Parameter]:
        """Make every UNet weight trainable and keep a frozen copy as the reference model."""
        if self._adapter_name is not None or self.reference_unet is not None:
            raise RuntimeError("this backbone is already set up for fine-tuning")
        self.unet.to(torch.float32)  # trainable weights in fp32; the reference the same function
        self.reference_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.unet.requires_grad_(True)
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[None]:
        """Within this context ``predict`` is the frozen reference: LoRA adapters disabled, or the
        frozen copy under full fine-tuning."""
        if self._reference_active:
            yield
            return
        self._reference_active = True
        if self._adapter_name is not None:
            self.unet.disable_adapters()
        try:
            yield
        finally:
            if self._adapter_name is not None:
                self.unet.enable_adapters()
            self._reference_active = False

    def to_channels_last(self) -> None:
        """The UNet and the VAE decoder in the channels-last memory format (same numbers up to
        float rounding; often faster convolutions)."""
        self.unet.to(memory_format=torch.channels_last)
        if self.vae is not None:
            self.vae.decoder.to(memory_format=torch.channels_last)

    def compile(self) -> None:
        """``torch.compile`` the UNet's and the VAE decoder's forward in place (``nn.Module.compile``:
        the modules, their state-dict keys and LoRA saving stay as they are). The first calls of
        each shape compile (slow); disabling the adapters for the reference recompiles once."""
        self.unet.compile()
        if self.vae is not None:
            self.vae.decoder.compile()

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def lora_state_dict(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The adapter's weights with diffusers-format keys (as ``save_lora_weights`` takes them);
        ``state_dict``: the UNet's weights gathered whole (a sharded UNet holds only its shard)."""
        if self._adapter_name is None:
            raise RuntimeError("no LoRA adapter is attached")
        return lora_state_dict(self.unet, self._adapter_name, state_dict)

    def save_lora(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` loadable by ``pipeline.load_lora_weights``
        (``state_dict``: as for :meth:`lora_state_dict`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # rank, alpha and targets travel with the weights: alpha != rank reloads correctly; sets
        # become sorted lists so the same weights give the same file in every process
        metadata = {k: sorted(v) if isinstance(v, set) else v
                    for k, v in self.unet.peft_config[self._adapter_name].to_dict().items()}
        type(self.pipeline).save_lora_weights(
            save_directory=str(directory),
            safe_serialization=True,
            **{f"{self.lora_prefix}_lora_layers": self.lora_state_dict(state_dict),
               f"{self.lora_prefix}_lora_adapter_metadata": metadata},
        )
        return directory / "pytorch_lora_weights.safetensors"
