"""ONNX models: a network exported with its spec inside, and run by ONNX Runtime behind the same
face as a PyTorch module, so evaluate, predict, the MLflow model and the benchmarks take either.

An ONNX file holds no pickled code; its spec (classes, input contract, the float network it came
from) is a JSON string in the file's metadata (`SPEC_KEY`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.training.models import ModelSpec

SPEC_KEY = "pipeline.spec"
PRECISION_KEY = "pipeline.precision"  # float32 | int8
INPUT, OUTPUT = "pixels", "logits"


def export(model: nn.Module, spec: ModelSpec, path: Path) -> Path:
    """`model` (raw pixels N x C x H x W float32 in, logits N x classes out; any batch size)
    as one ONNX file with `spec` in its metadata. torch.export-based exporter (torch's
    recommended path since 2.9); the weights are kept inside the file, not as external data."""
    example = torch.zeros(2, *spec.shape)  # not 1: torch.export specializes sizes 0 and 1
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    stamp(path, spec, "float32")
    return path


def stamp(path: Path, spec: ModelSpec, precision: str) -> None:
    """Write `spec` and `precision` into the ONNX file's metadata."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in (SPEC_KEY, PRECISION_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in ((SPEC_KEY, json.dumps(spec.to_dict())), (PRECISION_KEY, precision)):
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def file_bytes(path: Path) -> int:
    """The model's size on disk: the file, plus any external data files an ONNX file names."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        names = {
            entry.value
            for tensor in model.graph.initializer
            for entry in tensor.external_data
            if entry.key == "location"
        }
        size += sum((path.parent / name).stat().st_size for name in names)
    return size


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime (CPU) as a module: float32 tensors in, logits out, no
    gradients. `spec` and `precision` come from the file's metadata. Threads: as many as torch
    uses, so a comparison with the PyTorch model is on equal terms."""

    differentiable = False  # attribution methods that need gradients refuse it

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if SPEC_KEY not in meta:
            raise ValueError(f"{path} has no {SPEC_KEY} metadata: not exported by this pipeline")
        self.spec = ModelSpec.from_dict(json.loads(meta[SPEC_KEY]))
        self.precision = meta.get(PRECISION_KEY, "float32")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: pixels})[0])
