"""Model weights as run artifacts: a state dict + architecture spec that loads with
`weights_only=True`, so no pickled code is ever run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tracking.store import run_artifacts

if TYPE_CHECKING:
    import torch

    from pipeline.training.models import ModelSpec


WEIGHTS = "weights/model.pt"


def log_weights(model: torch.nn.Module, spec: ModelSpec) -> None:
    """State dict + architecture spec: loads with weights_only=True, no pickled code."""
    import mlflow
    import torch  # here, not at the top: validate and register never need it (5 s to import)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(WEIGHTS).name
        torch.save({"state_dict": model.state_dict(), "spec": spec.to_dict()}, path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(WEIGHTS).parent))


def load_weights(run_id: str) -> tuple[torch.nn.Module, dict]:
    import mlflow
    import torch

    from pipeline.training.models import ModelSpec, rebuild

    with tempfile.TemporaryDirectory() as tmp, run_artifacts(run_id, "weights"):
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=WEIGHTS, dst_path=tmp
        )
        saved = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(saved["spec"])
    model = rebuild(spec)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), spec
