"""Protect whole dataset exports (image folders, manifests, tar shards, Parquet, zip) in
resumable, streaming units, on one machine or on Ray. The Python API behind ``protect batch``."""

from protect.batch.run import BatchSummary, protect_export

__all__ = ["BatchSummary", "protect_export"]
