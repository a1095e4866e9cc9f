"""protect: make image folders unlearnable with bounded, imperceptible perturbations.

>>> import protect
>>> summary = protect.protect_folder("em-classwise", "photos/", "photos-protected/")
>>> summary.written, summary.failed

``protect.protect_export`` protects a whole dataset export (image folder, manifest, tar, Parquet,
zip) the same way; both are front-ends of one job (:mod:`protect.runner`).
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
from protect.runner import FileFailure, JobSummary, UsageError, protect_export, protect_folder

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BudgetError",
    "ConfigError",
    "Generator",
    "FileFailure",
    "ImageReadError",
    "JobSummary",
    "MethodConfig",
    "UsageError",
    "available_methods",
    "bounded_perturbation",
    "check_budget",
    "create_generator",
    "load_image",
    "protect_export",
    "protect_folder",
    "register",
    "resolve_config",
    "scan_folder",
]
