"""Model weights as run artifacts, of two kinds: a state dict + architecture spec (with the input
contract) that loads with `weights_only=True`, or an ONNX file with the spec in its metadata (an
int8 model from `pipeline compress`); never pickled code. `read_weights` chooses by kind, for
evaluate, predict, register and the MLflow model that serves them (`served.py`), exported when
the run is registered."""

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
ONNX_WEIGHTS = "weights/model.onnx"  # the other kind (pipeline/training/runtime.py)
EXAMPLE = "weights/input_example.npy"  # a few test images for the MLflow model's input example
CONTRACT = "contract.json"
CALIBRATION = "calibration.json"  # evaluate's temperature (training/calibration.py)
CONFORMAL = "conformal.npz"  # evaluate's held-out scores, to abstain by (training/conformal.py)


def _save(model: torch.nn.Module, spec: ModelSpec, path: Path) -> Path:
    import torch  # here, not at the top: validate and register never need it (5 s to import)

    torch.save({"state_dict": model.state_dict(), "spec": spec.to_dict()}, path)
    return path


def save_weights(
    model: torch.nn.Module, spec: ModelSpec, example: np.ndarray, folder: Path
) -> None:
    """Into `folder`, laid out as the run's artifacts: the weights (`weights/model.pt`),
    `contract.json`, and `example`, a few test images (uint8 N x C x H x W), kept for the MLflow
    model's input example. The recorder logs the folder."""
    (folder / WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    _save(model, spec, folder / WEIGHTS)
    _describe(spec, example, folder)


def save_onnx(path: Path, spec: ModelSpec, example: np.ndarray, folder: Path) -> None:
    """As `save_weights`, for an ONNX file (`runtime.export`, spec in its metadata): copied to
    `weights/model.onnx`."""
    (folder / ONNX_WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, folder / ONNX_WEIGHTS)
    _describe(spec, example, folder)


def _describe(spec: ModelSpec, example: np.ndarray, folder: Path) -> None:
    import numpy as np

    (folder / CONTRACT).write_text(json.dumps(spec.input_contract().to_dict(), indent=2) + "\n")
    np.save(folder / EXAMPLE, np.ascontiguousarray(example, np.uint8))


def weights_path(run_id: str) -> str:
    """The run's weights artifact: `weights/model.onnx` when it has one, else `weights/model.pt`."""
    import mlflow

    listed = {
        a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id, artifact_path="weights")
    }
    return ONNX_WEIGHTS if ONNX_WEIGHTS in listed else WEIGHTS


def export_model(run_id: str) -> str:
    """The run's MLflow model URI (its `model_uri` tag), logged first when the run has none: a
    pyfunc whose code is this installed package (`loader_module` `pipeline.tracking.served`),
    with the weights and the contract as its data, and the run's example images sent as image
    files in the input example. No code goes into the artifact store, so whatever serves it
    must have the project installed. Registration calls it, so only models that are registered
    pay for it. LookupError for a deleted run."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    run = mlflow.MlflowClient().get_run(run_id)
    if run.data.tags.get("model_uri"):
        return run.data.tags["model_uri"]
    with tempfile.TemporaryDirectory() as tmp, run_artifacts(run_id, "weights"):
        data = Path(tmp) / "model"  # the model's data folder: weights and contract, no code
        data.mkdir()
        kind = weights_path(run_id)
        listed = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id)}
        for path in (kind, CONTRACT, *({CALIBRATION} & listed)):
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=data)
        example = np.load(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=EXAMPLE, dst_path=tmp)
        )
        classes = json.loads((data / CONTRACT).read_text())["classes"]
        # Any object: files (base64 strings / bytes) or pixel arrays; the contract checks them
        # with pipeline predict's messages, where a typed signature would answer with MLflow's.
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
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module="pipeline.tracking.served",
                data_path=str(data),
                signature=signature,
                input_example=np.array([png_base64(image) for image in example], dtype=object),
                pip_requirements=_requirements(onnx=kind == ONNX_WEIGHTS),
            )
            mlflow.set_tag("model_uri", info.model_uri)
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


def _requirements(onnx: bool = False) -> list[str]:
    """Stated, not inferred: inference imports the whole environment in a subprocess (20 s of
    a 45 s `pipeline train` on digits) and lists packages the model never loads."""
    from importlib.metadata import version

    names = ("torch", "torchvision", "numpy", "pillow", "pandas", "pydantic", "pyyaml")
    names += ("onnxruntime",) if onnx else ()
    return [f"{name}=={version(name)}" for name in names]


def load_weights(
    run_id: str, keep: Path | None = None, sha256: str | None = None
) -> tuple[torch.nn.Module, ModelSpec]:
    """The run's network (eval mode) and its spec, of either kind (`read_weights`); the file is
    downloaded into `keep` when given (its size is a model's figure), else a temporary folder.
    `sha256`: the digest registered with the version; a file that differs is refused before it
    is read (CheckpointError). Raises LookupError when the run or its artifacts were deleted."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, run_artifacts(run_id, "weights"):
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=weights_path(run_id), dst_path=str(keep or tmp)
        )
        found = digest(path) if sha256 is not None else None
        if found != sha256:
            from pipeline.errors import CheckpointError

            raise CheckpointError(
                f"refused the weights of run {run_id}: their sha256 is {found[:16]}..., "
                f"not the {sha256[:16]}... registered with the version, so the artifact store "
                "was changed after registration. Restore the run's weights from a backup, or "
                "serve another version (`pipeline rollback` / `pipeline promote`)"
            )
        return read_weights(path)


def digest(path: str | Path) -> str:
    """The file's sha256 (hex), read 1 MiB at a time."""
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def weights_digest(run_id: str) -> str:
    """The sha256 of the run's weights file (`weights_path`), as registration records it."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, run_artifacts(run_id, "weights"):
        return digest(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=weights_path(run_id), dst_path=tmp
            )
        )


def temperature(run_id: str) -> float:
    """The run's calibration temperature (`calibration.json`, written by evaluate), or 1 for a
    run without one (evaluated before calibration, or a compressed challenger). ValueError for
    a value that is no finite number > 0."""
    import mlflow

    from pipeline.training.calibration import read_temperature

    with run_artifacts(run_id, "calibration"):
        listed = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id)}
        if CALIBRATION not in listed:
            return 1.0
        return read_temperature(mlflow.artifacts.load_dict(f"runs:/{run_id}/{CALIBRATION}"))


def held_out_scores(run_id: str) -> dict | None:
    """The run's held-out scores for abstaining (`conformal.npz`, written by evaluate:
    `nonconformity` and `energy`, float arrays of the validation split), or None for a run
    without them."""
    import mlflow
    import numpy as np

    with run_artifacts(run_id, "held-out scores"):
        listed = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run_id)}
        if CONFORMAL not in listed:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CONFORMAL, dst_path=tmp
            )
            with np.load(path, allow_pickle=False) as saved:
                return {k: saved[k] for k in ("nonconformity", "energy")}


def read_weights(path: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """A weights file as the network in eval mode and its spec, chosen by kind: an ONNX file
    (`.onnx`) runs in ONNX Runtime (`runtime.OnnxModel`); a state dict + spec loads with
    `weights_only=True`, so a crafted file cannot run code."""
    import pickle

    import torch

    from pipeline.errors import CheckpointError

    if Path(path).suffix == ".onnx":
        from pipeline.training.runtime import OnnxModel

        model = OnnxModel(path)
        return model.eval(), model.spec

    from pipeline.training.models import ModelSpec, rebuild

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # PyTorch's text advises weights_only=False: never
        lines = str(exc).splitlines()  # keep what it found ("... unsupported GLOBAL ...")
        why = next((line for line in lines if "unsupported" in line.lower()), "")
        raise CheckpointError(
            f"refused to load {Path(path).name}: it holds more than tensors and plain values "
            f"({why.strip() or type(exc).__name__}), so it was altered or is not a weights file "
            "of this pipeline. Do not load it otherwise; register the run's model again from "
            "a trusted copy"
        ) from None
    spec = ModelSpec.from_dict(saved["spec"])
    model = rebuild(spec)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), spec
