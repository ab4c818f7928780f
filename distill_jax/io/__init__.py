"""Run outputs: the workdir layout, Orbax checkpoints, metric writers and image grids."""

from distill_jax.io._atomic import atomic_write, atomic_write_text
from distill_jax.io.checkpoint import CheckpointError, Checkpointer
from distill_jax.io.images import grid_layout, save_grid, save_heatmap
from distill_jax.io.metrics import MetricWriter, ProgressLogger, format_duration, read_metrics
from distill_jax.io.workdir import ConfigMismatchError, Workdir

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConfigMismatchError",
    "MetricWriter",
    "ProgressLogger",
    "Workdir",
    "atomic_write",
    "atomic_write_text",
    "format_duration",
    "grid_layout",
    "read_metrics",
    "save_grid",
    "save_heatmap",
]
