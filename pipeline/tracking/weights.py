"""Model weights as run artifacts: a state dict + architecture spec (with the input contract)
that loads with `weights_only=True`, so no pickled code is ever run; and the MLflow model that
serves them (`served.py`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tracking.store import run_artifacts

if TYPE_CHECKING:
    import numpy as np
    import torch

    from pipeline.training.models import ModelSpec


WEIGHTS = "weights/model.pt"
CONTRACT = "contract.json"
CODE_FILE = Path(__file__).with_name("mlflow_model.py")


def _save(model: torch.nn.Module, spec: ModelSpec, path: Path) -> Path:
    import torch  # here, not at the top: validate and register never need it (5 s to import)

    torch.save({"state_dict": model.state_dict(), "spec": spec.to_dict()}, path)
    return path


def log_model(model: torch.nn.Module, spec: ModelSpec, example: np.ndarray) -> str:
    """To the active run: the weights, `contract.json`, and the MLflow model (a pyfunc from
    `mlflow_model.py`, this package bundled, the weights and the contract as its artifacts).
    `example`: a few test images, uint8 N x C x H x W, sent as image files in the input
    example. Returns the model's URI."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    import pipeline

    contract = spec.input_contract()
    classes = contract.classes
    # Any object: files (base64 strings / bytes) or pixel arrays; the contract checks them with
    # pipeline predict's messages, where a typed signature would answer with MLflow's own.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema(
            [
                ColSpec("string", "prediction"),
                ColSpec("double", "probability"),
                *(ColSpec("double", f"p_{c}") for c in classes),
            ]
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        described = Path(tmp) / CONTRACT
        described.write_text(json.dumps(contract.to_dict(), indent=2) + "\n")
        mlflow.log_artifact(str(described))
        weights = _save(model, spec, Path(tmp) / Path(WEIGHTS).name)
        mlflow.log_artifact(str(weights), artifact_path=str(Path(WEIGHTS).parent))
        code = Path(tmp) / "pipeline"
        shutil.copytree(
            Path(pipeline.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__")
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(CODE_FILE),
            artifacts={"weights": str(weights), "contract": str(described)},
            code_paths=[str(code)],
            signature=signature,
            input_example=np.array([png_base64(image) for image in example], dtype=object),
            pip_requirements=_requirements(),
        )
    return info.model_uri


def png_base64(image: np.ndarray) -> str:
    """uint8 C x H x W as a base64 PNG file, what a client sends."""
    import base64
    import io

    from PIL import Image

    pic = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    buffer = io.BytesIO()
    pic.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _requirements() -> list[str]:
    """Stated, not inferred: inference imports the whole environment in a subprocess (20 s of
    a 45 s `pipeline train` on digits) and lists packages the model never loads."""
    from importlib.metadata import version

    names = ("torch", "torchvision", "numpy", "pillow", "pandas", "pydantic", "pyyaml")
    return [f"{name}=={version(name)}" for name in names]


def load_weights(run_id: str) -> tuple[torch.nn.Module, ModelSpec]:
    """The run's network (eval mode) and its spec. Raises LookupError when the run or its
    artifacts were deleted."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, run_artifacts(run_id, "weights"):
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=WEIGHTS, dst_path=tmp
        )
        return read_weights(path)


def read_weights(path: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """A weights file (state dict + spec) as the network in eval mode and its spec; loaded with
    `weights_only=True`, so a crafted file cannot run code."""
    import torch

    from pipeline.training.models import ModelSpec, rebuild

    saved = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(saved["spec"])
    model = rebuild(spec)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), spec
