"""Where things live: resolved once by a wrapper (CLI or DAG task) and passed to the stages.

Two places: the workspace (params.yaml, data/, outputs/), where a command runs, and the shared
state (the MLflow store, the Optuna database, the promotion lock), which belongs to the project.
They are the same folder except in a `dvc exp run`, whose stages run in a workspace of DVC's
(`.dvc/tmp/exps/...` for --queue and --temp) and name the project in DVC_ROOT: experiments
write their outputs there and register into the project's registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PATHS = ("root", "code_root", "shared")


@dataclass(frozen=True)
class Settings:
    root: Path  # the workspace (params.yaml, data.dvc, dvc.yaml, data/, outputs/)
    tracking_uri: str  # MLflow tracking + registry
    artifact_root: str  # where new MLflow experiments store artifacts
    code_root: Path | None = None  # the git checkout of the code when `root` is elsewhere
    mlflow_wait_s: float = 60.0  # how long an interactive command waits for an MLflow server
    optuna_storage: str = ""  # Optuna studies (a relational DB); "": SQLite beside MLflow's
    shared: Path | None = None  # the project whose store and locks a workspace uses; None: root
    reports_in_git: bool = True  # False: reports/ goes to outputs/ (a DAG's shared checkout)
    registry_lock: str = ""  # PostgreSQL URL of the promotion lock; "": a file in the project

    def to_json(self) -> dict:
        """These settings as JSON values, for a process that cannot read them from its
        environment (`from_json` restores them)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, fields: dict) -> Settings:
        paths = {k: Path(v) for k, v in fields.items() if k in _PATHS and v is not None}
        return cls(**{**fields, **paths})

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
    def reports(self) -> Path:
        """What a revision keeps in git: the metrics and the plots' data (dvc.yaml). Airflow's
        runs keep theirs in outputs/: they leave the checkout they share as committed."""
        return self.root / "reports" if self.reports_in_git else self.outputs / "reports"

    def handoff(self, name: str) -> Path:
        """The file of a stage's hand-off (`Stage.hands_on`: "outputs/..." or "reports/...")."""
        folder, _, rest = name.partition("/")
        return self.reports / rest if folder == "reports" else self.root / name

    @property
    def series(self) -> Path:
        return self.reports / "plots"

    @property
    def sqlite_store(self) -> Path | None:
        """The SQLite file of a `sqlite:///` tracking URI; None for a server or another database."""
        uri = self.tracking_uri
        return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None

    @property
    def store(self) -> Path:
        """The project's own store folder (git-ignored): the default MLflow store and Optuna's
        SQLite file. Shared by every workspace of the project."""
        return (self.shared or self.root) / ".mlflow"

    @property
    def prediction_log(self) -> Path:
        """The embedded prediction log (git-ignored): Parquet files by day, the project's."""
        return (self.shared or self.root) / "outputs" / "monitor" / "predictions"

    @property
    def locks(self) -> Path:
        """The promotion locks: the project's, shared by its experiments' workspaces."""
        return (self.shared or self.root) / "outputs" / "locks"

    @property
    def study_storage(self) -> str:
        """Where sweep studies live: PIPELINE_OPTUNA_STORAGE (PostgreSQL in production), else
        a SQLite file in the project's store folder."""
        return self.optuna_storage or f"sqlite:///{self.store / 'optuna.db'}"

    @property
    def checkpoints(self) -> Path:
        """Where train resumes from; a volume every worker sees when tasks move between hosts."""
        return Path(os.environ.get("PIPELINE_CHECKPOINT_DIR") or self.outputs / "checkpoints")

    @classmethod
    def from_env(cls, root: str | Path | None = None) -> Settings:
        """The workspace: `root`, else PIPELINE_ROOT, else the nearest folder holding
        params.yaml from the working directory up (the working directory when none does). In
        a `dvc exp run` (DVC_EXP_NAME set) it is always the working directory, DVC's
        workspace, and the shared state stays with the project in DVC_ROOT.

        Defaults: MLflow on SQLite in the project's `.mlflow/` (git-ignored).
        MLFLOW_TRACKING_URI and MLFLOW_ARTIFACT_ROOT point a deployment elsewhere;
        PIPELINE_MLFLOW_WAIT_S bounds how long the CLI waits for an MLflow server that is down.
        The promotion lock lives where the registry does: PIPELINE_REGISTRY_LOCK_URI (the
        PostgreSQL database of an MLflow server), else the tracking URI when it is PostgreSQL.
        """
        experiment = bool(os.environ.get("DVC_EXP_NAME"))
        if root is None:
            given = None if experiment else os.environ.get("PIPELINE_ROOT")
            root = given or (Path.cwd() if experiment else _workspace_of(Path.cwd()))
        root = Path(root).resolve()
        project = os.environ.get("DVC_ROOT") if experiment else None
        shared = Path(project).resolve() if project else None
        store = (shared or root) / ".mlflow"
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}/mlflow.db"
        in_postgres = tracking if tracking.startswith("postgresql") else ""
        return cls(
            root=root,
            tracking_uri=tracking,
            artifact_root=os.environ.get("MLFLOW_ARTIFACT_ROOT") or (store / "artifacts").as_uri(),
            mlflow_wait_s=float(os.environ.get("PIPELINE_MLFLOW_WAIT_S") or 60),
            optuna_storage=os.environ.get("PIPELINE_OPTUNA_STORAGE", ""),
            shared=shared if shared != root else None,
            registry_lock=os.environ.get("PIPELINE_REGISTRY_LOCK_URI") or in_postgres,
        )


def _workspace_of(folder: Path) -> Path:
    """The nearest folder from `folder` up that holds params.yaml, as git finds its checkout;
    `folder` itself when none does (the commands that need params.yaml then say so)."""
    for candidate in (folder, *folder.parents):
        if (candidate / "params.yaml").is_file():
            return candidate
    return folder
