"""The interface every noise generator implements, and the registry that names them.

A generator is configured by a dataclass (defaults from ``configs/<name>.yaml``), may ``fit``
over a dataset at the working resolution, and returns a perturbation for a batch with
``perturb``. The shared :func:`bounded_perturbation` step projects it onto the budget; nobody
overrides that.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import torch

from protect import precision
from protect.autoset import AutoSetting
from protect.budget import check_eps, project_to_valid
from protect.config import ConfigError, build_config, read_default_config, read_yaml
from protect.ranks import SINGLE_PROCESS, Ranks
from protect.progress import Reporter


#: the largest working resolution: noise is mapped to each image's own size, and a fit holds
#: every image at this size (3 R^2 bytes each)
MAX_RESOLUTION = 1024


@dataclass
class MethodConfig:
    """Settings every method has.

    eps: L-inf budget in [0,1] pixel units (8/255 unless the method's paper says otherwise).
    resolution: working resolution (pixels, square) at which noise is optimised; noise is
        mapped back to each image's own size.
    batch_size: images per optimisation batch.
    precision: ``auto`` (bf16 autocast where the device runs it fast; see protect.precision), ``bf16`` or ``fp32``.
    """

    eps: float = 8 / 255
    resolution: int = 32
    batch_size: int = 512
    precision: str = "auto"

    def validate(self) -> None:
        check_eps(self.eps)
        if not 8 <= self.resolution <= MAX_RESOLUTION:
            raise ValueError(
                f"resolution must be between 8 and {MAX_RESOLUTION} pixels (the working size of the noise, mapped to "
                f"each image's own size afterwards); got {self.resolution}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {self.batch_size}")
        precision.check_precision(self.precision)


class FitScope(str, enum.Enum):
    """Which images a fitted generator can protect afterwards."""

    #: only the images it was fitted on (one noise per image, looked up by position)
    FITTED_IMAGES = "fitted-images"
    #: any image of a class it was fitted on (one noise per class)
    CLASSES = "classes"
    #: any image at all (a cluster protector, a text-to-noise generator)
    ANY_IMAGE = "any-image"

    def covers_new_images(self, labelled: bool) -> bool:
        """Whether a fit protects later images too (so it can be saved, reused, or done once
        on a sample of a large export); class noise needs the images' classes."""
        return self is FitScope.ANY_IMAGE or (self is FitScope.CLASSES and labelled)


@dataclass
class Batch:
    """A batch at the working resolution.

    images: float32 (N, 3, R, R) in [0, 1]; labels: int64 (N,) or None;
    indices: int64 (N,) positions in the dataset the generator was fitted on;
    paths: each image's name, when the caller knows it: its path relative to the input folder
    (POSIX), or its name within an export (independent of where the export lies); methods that
    describe images by text look their captions and codes up by it;
    class_names: each image's class name (None where it has none), when the source has classes;
    captions: each image's caption as given by its source (None where it has none), e.g. a
    manifest's caption column.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    indices: torch.Tensor
    paths: list[str] | None = None
    class_names: list[str | None] | None = None
    captions: list[str | None] | None = None


class Generator(ABC):
    """Base class of all noise generators. Subclasses set ``name``, ``config_class`` and
    ``needs_labels`` and implement :meth:`perturb`; :meth:`fit` is optional."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs_labels: ClassVar[bool] = False
    #: which images a fit protects: batch jobs fit once on a sample, and runs save or reuse a
    #: protector, whenever a fit covers new images (see :class:`FitScope`)
    fit_scope: ClassVar[FitScope] = FitScope.FITTED_IMAGES
    #: True when :meth:`fit` can run data-parallel (``self.ranks``, see :mod:`protect.ranks`)
    data_parallel_fit: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    #: settings whose defaults are chosen from the folder unless the user sets them (the number
    #: of images and classes, the images' size; see :mod:`protect.autoset`)
    auto_settings: ClassVar[tuple[AutoSetting, ...]] = ()

    def __init__(self, config: MethodConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.config = config
        self.device = torch.device(device)
        self.seed = seed
        #: the processes :meth:`fit` shares its work with (one unless a data-parallel fit set it)
        self.ranks: Ranks = SINGLE_PROCESS
        #: a folder the runner provides where a long :meth:`fit` keeps its progress after each
        #: step, and from which a fit of the same data, config and seed continues (None: keep none)
        self.fit_checkpoint_dir: Path | None = None

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, reporter: Reporter | None = None) -> None:
        """Learn whatever the method needs from the dataset.

        images: uint8 (N, 3, R, R) at the working resolution; labels: int64 (N,) or None.
        """

    @abstractmethod
    def perturb(self, batch: Batch) -> torch.Tensor:
        """Return float32 (N, 3, R, R) perturbations for ``batch`` (before projection)."""

    @classmethod
    def designed_against(cls, config: dict[str, Any]) -> tuple[str, ...]:
        """Names of the ``protect verify`` countermeasures the method, with this resolved config,
        is built to resist: recorded in protection.json, marked on the protection card."""
        return ()

    def fit_summary(self) -> dict[str, Any]:
        """JSON-ready facts about the last :meth:`fit` (rounds, convergence), recorded with the output."""
        return {}

    def label_report(self, labels: torch.Tensor) -> dict[str, Any]:
        """JSON-ready facts about the last :meth:`fit` measured against the folder's labels (int64
        (N,), the fitted images' order), e.g. how pure a label-free method's clusters are. Called
        after the fit, for the record only: nothing it reads reaches the noise."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that, loaded into a fresh generator with the same config, reproduce ``perturb``."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def autocast(self) -> torch.autocast:
        return precision.autocast(self.device, self.config.precision)


class StoredNoiseGenerator(Generator):
    """A generator whose fit produces a noise tensor, one row per image, looked up by index in
    :meth:`perturb`; the tensor is its whole state."""

    def __init__(self, config: MethodConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(config, device=device, seed=seed)
        self.noise: torch.Tensor | None = None

    def _stored_noise(self) -> torch.Tensor:
        if self.noise is None:
            raise RuntimeError(f"{self.name}: call fit() (or load_state_dict()) before perturb()")
        return self.noise

    def perturb(self, batch: Batch) -> torch.Tensor:
        return self._stored_noise()[batch.indices.cpu()].to(batch.images.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.noise is None else {"noise": self.noise}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.noise = state["noise"].float()


def bounded_perturbation(generator: Generator, batch: Batch) -> torch.Tensor:
    """The perturbation of ``batch`` projected onto the eps ball and the [0, 1] pixel range."""
    delta = generator.perturb(batch).to(batch.images.device, torch.float32)
    return project_to_valid(batch.images, delta, generator.config.eps)


_REGISTRY: dict[str, type[Generator]] = {}
G = TypeVar("G", bound=type[Generator])


def register(name: str) -> Callable[[G], G]:
    """Class decorator: make a generator available under ``name``."""

    def decorate(cls: G) -> G:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _import_methods() -> None:
    import protect.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def available_methods() -> dict[str, type[Generator]]:
    """Every registered method, by name."""
    _import_methods()
    return dict(sorted(_REGISTRY.items()))


def method_class(name: str) -> type[Generator]:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]


def resolve_config(
    name: str,
    *,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    eps: float | None = None,
) -> MethodConfig:
    """The config for method ``name``: defaults < its YAML < ``config_file`` < overrides < eps."""
    cls = method_class(name)
    layers: list[tuple[str, dict[str, Any]]] = [read_default_config(f"{name}.yaml")]
    if config_file is not None:
        layers.append((str(config_file), read_yaml(config_file)))
    if overrides:
        layers.append(("--set", overrides))
    if eps is not None:
        layers.append(("--eps", {"eps": eps}))
    return build_config(cls.config_class, *layers)


def create_generator(
    name: str, config: MethodConfig | None = None, *, device: torch.device | str = "cpu", seed: int = 0
) -> Generator:
    """Instantiate a registered method (with its resolved default config when none is given)."""
    cls = method_class(name)
    if config is None:
        config = resolve_config(name)
    if not isinstance(config, cls.config_class):
        raise ConfigError(f"{name} expects a {cls.config_class.__name__}, got {type(config).__name__}")
    return cls(config, device=device, seed=seed)


def describe_fields(config_class: type[MethodConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class)]
