"""The T2UE text-to-noise network, its files, and noise from a caption alone.

A generator G maps the CLIP encoding of a caption t and a random code z ~ N(0, I) to an L-inf
perturbation of at most eps (8/255), float32 (N, 3, R, R). Two backbones:

- ``ssa`` (the paper's, Fig. 3): G(e, z) = eps * tanh(conv(blocks(reshape(FC(z))))), with e the
  CLIP text embedding f_T(t). FC(z) is reshaped to a 4x4 feature map (512 channels in the paper)
  and grown by semantic-spatial aware blocks (SSACN, from SSA-GAN: Liao et al., CVPR 2022), each
  doubling the size and normalising its features with SSCBN, a batch norm whose scale and shift
  are predicted from e and applied where a predicted spatial mask is high.
- ``unet``: a conditional UNet (diffusers' ``UNet2DConditionModel``, as in latent diffusion)
  whose input is FC(z) as an 8x8 map grown to R, whose cross-attention layers attend to the
  CLIP text encoder's per-token features, and whose class embedding is e; one pass, output
  eps * tanh.

A trained generator is stored as ``NAME.safetensors`` (weights plus a fingerprint of the text
encoder) and ``NAME.yaml`` (architecture, eps, which CLIP it belongs to, how it was trained).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from protect.images import write_text_atomic
from protect.models.clip import ClipEncoders, load_clip

# SSA-GAN's channel multipliers of the base width, 4x4 map first (Liao et al., CVPR 2022); a
# generator for a smaller output keeps the last ones (it needs fewer upsampling blocks).
CHANNEL_MULTIPLIERS = (8, 8, 8, 8, 8, 4, 2, 1)
# Captions whose embeddings fingerprint the text encoder a generator was trained with.
_PROBE_CAPTIONS = ("a photo of a dog.", "a red car parked on a street.", "text to unlearnable noise")


BACKBONES = ("ssa", "unet")


class T2UEError(ValueError):
    """A generator file, a captions file or training data cannot be used; the message says why."""


class SemanticSpatialBatchNorm(nn.Module):
    """SSCBN: batch norm without its own affine parameters; scale 1 + m * gamma(e) and shift
    m * beta(e), with gamma, beta small MLPs of the text embedding e (N, D) and m (N, 1, H, W)
    the block's predicted mask in [0, 1]."""

    def __init__(self, channels: int, text_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(True), nn.Linear(hidden, channels))
        self.beta = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(True), nn.Linear(hidden, channels))
        # Start as plain batch norm; the text learns its way in.
        for head in (self.gamma[-1], self.beta[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, h: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scale = 1 + mask * self.gamma(text)[:, :, None, None]
        shift = mask * self.beta(text)[:, :, None, None]
        return self.norm(h) * scale + shift


class SemanticSpatialBlock(nn.Module):
    """SSACN block: optional 2x nearest upsampling, a mask predictor (conv-BN-ReLU-conv-sigmoid
    on the block input), two SSCBN-LeakyReLU-conv3x3 stages, and a residual shortcut (1x1 conv
    when the width changes). (N, C_in, H, W) -> (N, C_out, 2H or H, 2W or W)."""

    def __init__(self, in_channels: int, out_channels: int, text_dim: int, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        mask_hidden = max(16, in_channels // 4)
        self.mask = nn.Sequential(
            nn.Conv2d(in_channels, mask_hidden, 3, padding=1), nn.BatchNorm2d(mask_hidden), nn.ReLU(True),
            nn.Conv2d(mask_hidden, 1, 1), nn.Sigmoid(),
        )
        self.norm1 = SemanticSpatialBatchNorm(in_channels, text_dim)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = SemanticSpatialBatchNorm(out_channels, text_dim)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        mask = self.mask(x)
        h = self.conv1(F.leaky_relu(self.norm1(x, text, mask), 0.2))
        h = self.conv2(F.leaky_relu(self.norm2(h, text, mask), 0.2))
        return self.shortcut(x) + h


@dataclass(frozen=True)
class GeneratorSpec:
    """What builds a text-to-noise generator and which CLIP text encoder it belongs to.

    resolution: output size R (square); the ``ssa`` network grows 4 -> the next power of two
    >= R, the ``unet`` works at the next multiple of 8 >= R, and both resize to R. text_dim: the
    CLIP embedding size; z_dim: size of the random code; width: the channel base (``ssa``: the
    4x4 map has ``width`` channels, 512 in the paper; ``unet``: its levels have width / 2,
    width and width channels). backbone: ``ssa`` or ``unet``."""

    resolution: int
    text_dim: int
    z_dim: int = 100
    width: int = 512
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    backbone: str = "ssa"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise T2UEError(f"unknown generator backbone {self.backbone!r}; available: {', '.join(BACKBONES)}")


@dataclass
class TextCondition:
    """The CLIP encoding of N captions a generator is conditioned on: ``pooled`` (N, D) unit-length
    text embeddings f_T(t); ``tokens`` (N, L, D) the text encoder's per-token features projected
    to the embedding space and ``mask`` (N, L) bool, True on real tokens (None when the backbone
    does not use them)."""

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pooled)

    def __getitem__(self, index: torch.Tensor) -> TextCondition:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return TextCondition(self.pooled[index], pick(self.tokens), pick(self.mask))

    def to(self, device: torch.device | str) -> TextCondition:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TextCondition(self.pooled.to(device), move(self.tokens), move(self.mask))


class NoiseGenerator(nn.Module):
    """What both backbones share: ``forward(text, z)`` -> tanh output (N, 3, R, R) in [-1, 1];
    multiply by eps for the perturbation (:meth:`perturbation`)."""

    spec: GeneratorSpec
    uses_tokens = False

    def _to_resolution(self, out: torch.Tensor) -> torch.Tensor:
        if out.shape[-1] != self.spec.resolution:
            # bilinear resizing never leaves [-1, 1]
            out = F.interpolate(out, size=(self.spec.resolution, self.spec.resolution), mode="bilinear", align_corners=False)
        return out

    def perturbation(self, text: TextCondition, z: torch.Tensor, eps: float) -> torch.Tensor:
        """eps * G(t, z): float32 (N, 3, R, R) with every value in [-eps, eps] (L-inf)."""
        return eps * self.forward(text, z).float()


class TextToNoiseGenerator(NoiseGenerator):
    """The ``ssa`` backbone, G(e, z): text embedding e (N, text_dim) from ``text.pooled``, code
    (N, z_dim) -> tanh output (N, 3, R, R) in [-1, 1]."""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.spec = spec
        upsamplings = max(0, math.ceil(math.log2(spec.resolution / 4)))
        multipliers = CHANNEL_MULTIPLIERS[-(upsamplings + 2):] if upsamplings + 2 <= len(CHANNEL_MULTIPLIERS) else (
            (CHANNEL_MULTIPLIERS[0],) * (upsamplings + 2 - len(CHANNEL_MULTIPLIERS)) + CHANNEL_MULTIPLIERS
        )
        channels = [max(1, spec.width * m // 8) for m in multipliers]
        self.start_channels = channels[0]
        self.fc = nn.Linear(spec.z_dim, channels[0] * 16)
        # The first block works on the 4x4 map itself; every later one doubles the size.
        self.blocks = nn.ModuleList(
            SemanticSpatialBlock(channels[i], channels[i + 1], spec.text_dim, upsample=i > 0)
            for i in range(len(channels) - 1)
        )
        self.head = nn.Conv2d(channels[-1], 3, 3, padding=1)

    def forward(self, text: TextCondition, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(len(z), self.start_channels, 4, 4)
        for block in self.blocks:
            h = block(h, text.pooled)
        return self._to_resolution(torch.tanh(self.head(F.leaky_relu(h, 0.2))))


# The unet's input: FC(z) as a map of this size and depth, grown to the working size.
_UNET_CODE_SIZE, _UNET_CODE_CHANNELS = 8, 4


class UNetTextToNoiseGenerator(NoiseGenerator):
    """The ``unet`` backbone: diffusers' ``UNet2DConditionModel`` with three levels (width / 2,
    width, width channels at the full, half and quarter size; self- and cross-attention at the
    half and quarter sizes and in the middle block) run once at a fixed timestep. Input FC(z) as a 4 x 8 x 8 map resized to the working size; cross-attention
    on ``text.tokens`` (padding masked); ``text.pooled`` as the class embedding. Group norm only,
    so one caption's noise does not depend on the rest of its batch."""

    uses_tokens = True

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        try:
            from diffusers import UNet2DConditionModel
        except ImportError:
            raise ImportError("the unet backbone needs diffusers: pip install 'protect[clip]' (or pip install diffusers)") from None
        self.spec = spec
        self.size = 8 * math.ceil(spec.resolution / 8)
        channels = (max(8, spec.width // 2), max(8, spec.width), max(8, spec.width))
        self.fc = nn.Linear(spec.z_dim, _UNET_CODE_CHANNELS * _UNET_CODE_SIZE**2)
        self.unet = UNet2DConditionModel(
            sample_size=self.size, in_channels=_UNET_CODE_CHANNELS, out_channels=3, block_out_channels=channels,
            # attention at 1/2 and 1/4 of the size only: at full size it costs most of the time
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1, cross_attention_dim=spec.text_dim, attention_head_dim=4,
            norm_num_groups=math.gcd(32, channels[0]), class_embed_type="projection",
            projection_class_embeddings_input_dim=spec.text_dim,
        )

    def forward(self, text: TextCondition, z: torch.Tensor) -> torch.Tensor:
        if text.tokens is None or text.mask is None:
            raise T2UEError("the unet backbone needs the per-token text features (encode_captions(..., tokens=True))")
        code = self.fc(z).view(len(z), _UNET_CODE_CHANNELS, _UNET_CODE_SIZE, _UNET_CODE_SIZE)
        sample = F.interpolate(code, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.unet(sample, 0, encoder_hidden_states=text.tokens.to(sample.dtype), class_labels=text.pooled.to(sample.dtype),
                        encoder_attention_mask=text.mask.to(sample.dtype), return_dict=False)[0]
        return self._to_resolution(torch.tanh(out))


def build_generator(spec: GeneratorSpec, seed: int = 0) -> NoiseGenerator:
    """A freshly initialised generator of ``spec.backbone``, deterministic for ``seed`` (global
    RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNetTextToNoiseGenerator(spec) if spec.backbone == "unet" else TextToNoiseGenerator(spec)


# Text and codes ---------------------------------------------------------------------------


@torch.no_grad()
def embed_texts(clip: ClipEncoders, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-length CLIP text embeddings, float32 (N, D) on the CPU."""
    chunks = [clip.encode_text(texts[i : i + batch_size]).float() for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1).cpu()


def _token_features(clip: ClipEncoders, ids: torch.Tensor) -> torch.Tensor:
    """Per-token outputs of an open_clip CLIP's text transformer, projected like its pooled
    embedding: (N, L, D)."""
    model = clip.model
    if not all(hasattr(model, name) for name in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        raise T2UEError(f"the unet backbone needs a CLIP with its own text transformer; {clip.name} has none")
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


@torch.no_grad()
def encode_captions(clip: ClipEncoders, texts: list[str], *, tokens: bool = False, batch_size: int = 256) -> TextCondition:
    """The :class:`TextCondition` of ``texts`` on the CPU: unit-length embeddings, and with
    ``tokens`` the per-token features and their padding mask (token id 0 is padding)."""
    pooled = embed_texts(clip, texts, batch_size)
    if not tokens:
        return TextCondition(pooled)
    device = next(clip.model.parameters()).device
    features, masks = [], []
    for start in range(0, len(texts), batch_size):
        ids = clip.tokenizer(texts[start : start + batch_size]).to(device)
        features.append(_token_features(clip, ids).float().cpu())
        masks.append((ids != 0).cpu())
    return TextCondition(pooled, torch.cat(features), torch.cat(masks))


def _stable_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def code_for(key: str, seed: int, z_dim: int) -> torch.Tensor:
    """The random code z ~ N(0, I) (z_dim,) belonging to ``key`` (a caption or an image path)
    under ``seed``: the same key and seed always give the same z, on any machine."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(_stable_int("z", seed, key) % 2**63))


def template_for(key: str, seed: int, count: int) -> int:
    """Which of ``count`` templates the image ``key`` gets under ``seed`` (sample-wise captions)."""
    return _stable_int("template", seed, key) % count


def text_fingerprint(clip: ClipEncoders) -> torch.Tensor:
    """Embeddings of fixed probe captions (P, D): tells whether two CLIPs embed text alike."""
    return embed_texts(clip, list(_PROBE_CAPTIONS))


# Saved generators -------------------------------------------------------------------------


def generator_paths(path: Path | str) -> tuple[Path, Path]:
    """(weights .safetensors, description .yaml) of a generator given either file or the stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".yaml") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".yaml")


def save_generator(path: Path | str, net: NoiseGenerator, eps: float, fingerprint: torch.Tensor, facts: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors, weights + text-encoder fingerprint) and its .yaml beside it,
    each atomically; the YAML last, so a listed generator always has its weights. Returns the
    weights path."""
    weights, description = generator_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors["text_fingerprint"] = fingerprint.contiguous()
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(weights)
    document = {
        "format": "protect-t2ue-generator/1",
        "paper": "Ma et al., T2UE (arXiv:2508.03091)",
        "eps": eps,
        "spec": dataclasses.asdict(net.spec),
        **facts,
    }
    write_text_atomic(description, yaml.safe_dump(document, sort_keys=False))
    return weights


@dataclass
class LoadedGenerator:
    """A trained generator in eval mode with the CLIP that embeds its captions."""

    net: NoiseGenerator
    clip: ClipEncoders
    eps: float
    description: dict[str, Any]

    def embed(self, texts: list[str]) -> TextCondition:
        return encode_captions(self.clip, texts, tokens=self.net.uses_tokens)


def read_generator_description(path: Path | str) -> dict[str, Any]:
    """The YAML of a saved generator; :class:`T2UEError` naming the file when it is missing."""
    weights, description = generator_paths(path)
    for needed in (weights, description):
        if not needed.is_file():
            raise T2UEError(
                f"t2ue generator file not found: {needed}; train one with `protect t2ue train DATA OUT_DIR` "
                "(it writes OUT_DIR/generator.safetensors and generator.yaml) and pass it with --set generator=PATH"
            )
    document = yaml.safe_load(description.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("format") != "protect-t2ue-generator/1":
        raise T2UEError(f"{description} is not a t2ue generator description (format protect-t2ue-generator/1)")
    return document


def load_generator(
    path: Path | str, *, clip_weights: str | None = None, device: torch.device | str = "cpu", clip_option: str = "surrogate_weights"
) -> LoadedGenerator:
    """Load a generator saved by :func:`save_generator` and the CLIP text encoder it was trained
    with (local weights only, see :func:`protect.models.clip.load_clip`); refuses a CLIP whose text
    embeddings differ from those the generator was trained on."""
    document = read_generator_description(path)
    weights, _ = generator_paths(path)
    spec = GeneratorSpec(**document["spec"])  # files written before backbones existed are ``ssa``
    tensors = load_file(str(weights))
    net = build_generator(spec)
    net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
    net.to(device).eval().requires_grad_(False)
    clip = load_clip(spec.clip_model, pretrained=spec.clip_pretrained, weights=clip_weights or None, device=device, option=clip_option)
    expected, found = tensors["text_fingerprint"].float(), text_fingerprint(clip)
    if found.shape != expected.shape or not torch.allclose(found, expected, atol=1e-3):
        raise T2UEError(
            f"{weights}: the CLIP text encoder ({spec.clip_model}, weights {clip.weights}) is not the one this "
            "generator was trained with; pass the same CLIP weights file"
        )
    return LoadedGenerator(net, clip, float(document["eps"]), document)


@torch.no_grad()
def noise_from_text(
    generator: LoadedGenerator, texts: list[str], codes: torch.Tensor, *, eps: float | None = None
) -> torch.Tensor:
    """Perturbations float32 (N, 3, R, R) in [-eps, eps] for N captions and codes (N, z_dim),
    from the text alone. eps defaults to the generator's training budget."""
    device = next(generator.net.parameters()).device
    embeddings = generator.embed(texts).to(device)
    return generator.net.perturbation(embeddings, codes.to(device), generator.eps if eps is None else eps).cpu()
