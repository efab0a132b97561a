"""Where things live: resolved once by a wrapper (CLI or DAG task) and passed to the stages."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    root: Path  # the project checkout (params.yaml, data.dvc, dvc.yaml)
    tracking_uri: str  # MLflow tracking + registry
    artifact_root: str  # where new MLflow experiments store artifacts
    code_root: Path | None = None  # the git checkout of the code when `root` is elsewhere
    mlflow_wait_s: float = 60.0  # how long an interactive command waits for an MLflow server
    optuna_storage: str = ""  # Optuna studies (a relational DB); "": SQLite beside MLflow's

    @property
    def code(self) -> Path:
        """Whose git commit a run records: the code's checkout (reproduce works in a copy)."""
        return self.code_root or self.root

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def study_storage(self) -> str:
        """Where sweep studies live: PIPELINE_OPTUNA_STORAGE (PostgreSQL in production), else
        a SQLite file in the project's store folder."""
        return self.optuna_storage or f"sqlite:///{self.root / '.mlflow' / 'optuna.db'}"

    @property
    def checkpoints(self) -> Path:
        """Where train resumes from; a volume every worker sees when tasks move between hosts."""
        return Path(os.environ.get("PIPELINE_CHECKPOINT_DIR") or self.outputs / "checkpoints")

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> Settings:
        """Defaults: the checkout around this package, MLflow on SQLite inside it (git-ignored).

        PIPELINE_ROOT, MLFLOW_TRACKING_URI and MLFLOW_ARTIFACT_ROOT point a deployment elsewhere;
        PIPELINE_MLFLOW_WAIT_S bounds how long the CLI waits for an MLflow server that is down.
        """
        root = Path(root or os.environ.get("PIPELINE_ROOT") or Path(__file__).parents[1]).resolve()
        store = root / ".mlflow"
        return cls(
            root=root,
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}/mlflow.db",
            artifact_root=os.environ.get("MLFLOW_ARTIFACT_ROOT") or (store / "artifacts").as_uri(),
            mlflow_wait_s=float(os.environ.get("PIPELINE_MLFLOW_WAIT_S") or 60),
            optuna_storage=os.environ.get("PIPELINE_OPTUNA_STORAGE", ""),
        )
