"""``t2ue``: noise from each image's text description, by a trained text-to-noise generator.

Ma et al., "T2UE: Generating Unlearnable Examples from Text Descriptions" (arXiv:2508.03091);
the generator and its training are in :mod:`protect.t2ue` (``protect t2ue train``). Nothing is
fitted here and the image pixels are never used: each image's perturbation (L-inf, eps 8/255)
is eps * G(f_T(caption), z), resized to the image.

Captions: ``captions`` (a CSV/JSONL of image path relative to the input folder, caption), or,
for a labelled folder, the class names in templates. ``mode``:

- ``classwise``: the first template, and z fixed per caption (derived from the caption and the
  seed): every image of a class gets the same noise;
- ``samplewise``: a template drawn per image, and z per image (derived from its path and the
  seed): every image gets its own noise.

``generator=random`` builds an untrained generator for a tiny CLIP: for tests only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from protect.config import ConfigError
from protect.generator import Batch, FitScope, Generator, MethodConfig, register
from protect.models.clip import load_clip
from protect.progress import Reporter
from protect.t2ue import (
    CLIP_TEMPLATES,
    GeneratorSpec,
    LoadedGenerator,
    T2UEError,
    build_generator,
    code_for,
    load_generator,
    read_caption_records,
    read_generator_description,
    template_for,
)

MODES = ("classwise", "samplewise")


@dataclass
class T2UEConfig(MethodConfig):
    """generator: a trained generator (``.safetensors`` with its ``.yaml``; ``protect t2ue
    train`` writes one), or ``random`` (tests only). surrogate_weights: local weights of the CLIP
    the generator was trained with (empty: open_clip's Hugging Face cache; ``random`` for tests).
    surrogate_model / surrogate_pretrained: that CLIP, read from the generator's YAML when
    empty; needed for ``generator=random``. mode: classwise or samplewise. captions: CSV/JSONL
    of (image, caption); empty = class names in ``templates``. generator_width / z_dim: the
    architecture of a ``random`` generator only."""

    batch_size: int = 128
    generator: str = ""
    surrogate_model: str = ""
    surrogate_pretrained: str = "openai"
    surrogate_weights: str = ""
    mode: str = "classwise"
    captions: str = ""
    templates: list[str] = field(default_factory=lambda: list(CLIP_TEMPLATES))
    generator_width: int = 512
    z_dim: int = 100

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not self.generator:
            raise ValueError(
                "t2ue needs a trained generator: train one with `protect t2ue train DATA OUT_DIR` and pass "
                "--set generator=OUT_DIR/generator.safetensors"
            )
        if self.generator == "random" and not self.surrogate_model:
            raise ValueError("generator=random needs surrogate_model (e.g. protect-tiny-clip with surrogate_weights=random)")
        if not self.templates or not all(isinstance(t, str) and "{}" in t for t in self.templates):
            raise ValueError("templates must be a non-empty list of strings, each with {} for the class name")


@register("t2ue")
class TextToUnlearnable(Generator):
    summary = "T2UE: noise generated from each image's caption alone by a trained text-to-noise generator (Ma et al. 2025)."
    config_class = T2UEConfig
    needs_labels = False
    #: perturb depends only on the captions (and paths), so a fit protects any image
    fit_scope = FitScope.ANY_IMAGE

    def __init__(self, config: T2UEConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(config, device=device, seed=seed)
        try:
            self.loaded = self._load()
            self.captions = self._read_captions()
        except (T2UEError, FileNotFoundError) as exc:  # ClipWeightsNotFound is a FileNotFoundError
            raise ConfigError(str(exc)) from None

    def _load(self) -> LoadedGenerator:
        cfg: T2UEConfig = self.config
        if cfg.generator == "random":
            clip = load_clip(cfg.surrogate_model, pretrained=cfg.surrogate_pretrained, weights=cfg.surrogate_weights or None,
                             device=self.device)
            dim = int(clip.model.text_projection.shape[1]) if hasattr(clip.model, "text_projection") else clip.encode_text(["x"]).shape[1]
            spec = GeneratorSpec(cfg.resolution, dim, cfg.z_dim, cfg.generator_width, cfg.surrogate_model, cfg.surrogate_pretrained)
            net = build_generator(spec, seed=0).to(self.device).eval().requires_grad_(False)
            return LoadedGenerator(net, clip, cfg.eps, {"generator": "random"})
        description = read_generator_description(cfg.generator)
        trained_with = description["spec"]["clip_model"]
        if cfg.surrogate_model and cfg.surrogate_model != trained_with:
            raise T2UEError(f"{cfg.generator} was trained with CLIP {trained_with}, not surrogate_model={cfg.surrogate_model}")
        return load_generator(cfg.generator, clip_weights=cfg.surrogate_weights or None, device=self.device)

    def _read_captions(self) -> dict[str, str] | None:
        if not self.config.captions:
            return None
        return {PurePosixPath(image).as_posix(): caption for image, caption in read_caption_records(Path(self.config.captions))}

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, reporter: Reporter | None = None) -> None:
        """Nothing to fit: the generator was trained beforehand and never sees these images."""
        if reporter is not None and self.config.generator == "random":
            reporter.message("t2ue: the generator is untrained (generator=random): for tests only, no protection", "warning")

    # captions and codes -------------------------------------------------------------------
    def caption_of(self, path: str, given: str | None = None, class_name: str | None = None) -> str:
        """The caption of the image named ``path``: the caption its source gives, else its line
        in the captions file, else a template over its class name (fixed template class-wise,
        one per image sample-wise)."""
        cfg: T2UEConfig = self.config
        if given:
            return given
        if self.captions is not None:
            if path not in self.captions:
                raise ConfigError(f"{cfg.captions} has no caption for {path} (image paths are relative to the input folder)")
            return self.captions[path]
        if class_name is None:
            raise ConfigError(f"t2ue needs a caption for {path}: pass --captions FILE (CSV/JSONL of image,caption), "
                              "give a caption column, or use a source with one class per image (a folder per class)")
        name = class_name.replace("_", " ")
        template = cfg.templates[0] if cfg.mode == "classwise" else cfg.templates[template_for(path, self.seed, len(cfg.templates))]
        return template.format(name)

    def code_of(self, path: str, caption: str) -> torch.Tensor:
        key = caption if self.config.mode == "classwise" else path
        return code_for(key, self.seed, self.loaded.net.spec.z_dim)

    def perturb(self, batch: Batch) -> torch.Tensor:
        if batch.paths is None:
            raise ConfigError("t2ue describes images by caption and needs their paths; this caller gives none")
        given = batch.captions or [None] * len(batch.paths)
        classes = batch.class_names or [None] * len(batch.paths)
        captions = [self.caption_of(path, caption, name) for path, caption, name in zip(batch.paths, given, classes)]
        codes = torch.stack([self.code_of(path, caption) for path, caption in zip(batch.paths, captions)])
        with torch.no_grad():
            embeddings = self.loaded.embed(captions).to(self.device)
            delta = self.loaded.net.perturbation(embeddings, codes.to(self.device), self.config.eps)
        r = self.config.resolution
        if delta.shape[-1] != r:
            delta = torch.nn.functional.interpolate(delta, size=(r, r), mode="bilinear", align_corners=False)
        return delta.to(batch.images.device)

    def fit_summary(self) -> dict[str, Any]:
        description = self.loaded.description
        return {
            "generator": self.config.generator if self.config.generator == "random" else Path(self.config.generator).name,
            "generator_trained_on": description.get("trained_on"),
            "generator_eps": self.loaded.eps,
            "clip": self.loaded.net.spec.clip_model,
            "mode": self.config.mode,
            "captions": Path(self.config.captions).name if self.config.captions else "class-name templates",
        }
