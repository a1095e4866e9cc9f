"""The one job runner: a source (an image folder or a dataset export) protected into a folder,
resumable, on one machine or on Ray. ``protect run`` and ``protect batch`` are its two
front-ends (:mod:`protect.runner.api`).

- :mod:`~protect.runner.job`: the job's phases (plan, fit, apply, join, finish), its checks,
  state folder, manifest and ``protection.json``;
- :mod:`~protect.runner.formats`: the sources (image folders, manifests, tar, Parquet, zip);
- :mod:`~protect.runner.unit`: what a worker does with one unit of records;
- :mod:`~protect.runner.engines`: where units run (local processes, Ray);
- :mod:`~protect.runner.journal`: the progress journal that makes a job resumable;
- :mod:`~protect.runner.labels`: the label policy of every fit.
"""

from protect.runner.api import protect_export, protect_folder
from protect.runner.job import (
    MANIFEST_NAME,
    PROTECTION_NAME,
    STATE_DIR_NAME,
    FileFailure,
    Job,
    JobError,
    JobSummary,
    UsageError,
    run_job,
)

__all__ = [
    "MANIFEST_NAME",
    "PROTECTION_NAME",
    "STATE_DIR_NAME",
    "FileFailure",
    "Job",
    "JobError",
    "JobSummary",
    "UsageError",
    "protect_export",
    "protect_folder",
    "run_job",
]
