"""The `track` section: where a run's metric rows go besides metrics.jsonl (docs/tracking.md)."""

from __future__ import annotations

from pydantic import Field

from cloudedge.config.base import StrictModel


class TrackConfig(StrictModel):
    """Experiment trackers fed with every metric row. Both need ``pip install 'cloudedge[tracking]'``."""

    tensorboard: bool = Field(default=False, description="write TensorBoard event files under RUN/tensorboard/")
    mlflow: bool = Field(default=False, description="log params, every row's metrics and the report to MLflow")
    mlflow_uri: str | None = Field(
        default=None, description="MLflow tracking URI (a server or file:DIR); default: a file store in RUN/mlruns")
    experiment: str | None = Field(default=None, description="MLflow experiment name (default: the run's name)")

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.mlflow
