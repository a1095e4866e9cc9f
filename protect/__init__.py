"""protect: make image folders unlearnable with bounded, imperceptible perturbations.

>>> import protect
>>> summary = protect.protect_folder("em-classwise", "photos/", "photos-protected/")
>>> summary.written, summary.failed
"""

from protect.budget import BudgetError, check_budget
from protect.config import ConfigError
from protect.generator import (
    Batch,
    Generator,
    MethodConfig,
    available_methods,
    bounded_perturbation,
    create_generator,
    register,
    resolve_config,
)
from protect.images import ImageReadError, load_image, scan_folder
from protect.pipeline import RunSummary, UsageError, protect_folder

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BudgetError",
    "ConfigError",
    "Generator",
    "ImageReadError",
    "MethodConfig",
    "RunSummary",
    "UsageError",
    "available_methods",
    "bounded_perturbation",
    "check_budget",
    "create_generator",
    "load_image",
    "protect_folder",
    "register",
    "resolve_config",
    "scan_folder",
]
