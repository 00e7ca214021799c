"""Run directories, metrics, plots and reports."""

from cloudedge.track.progress import progress_bar
from cloudedge.track.run import RunDir, read_metrics

__all__ = ["RunDir", "progress_bar", "read_metrics"]
