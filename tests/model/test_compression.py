"""The compression functions on small networks: pruning removes channels and `rebuild(spec)`
makes the pruned network; the distillation loss is the textbook one; int8 ONNX keeps the input
contract and its spec, and weights load by kind."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PruneConfig
from pipeline.errors import ConfigError
from pipeline.training import compression, efficiency, runtime
from pipeline.training.models import ModelSpec, rebuild

CLASSES = tuple("0123456789")


def _spec(name: str, shape=(1, 28, 28), hidden=128) -> ModelSpec:
    return ModelSpec({"name": name, "hidden": hidden, "dropout": 0.0}, shape, CLASSES, 33.0, 78.0)


def _size(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


@pytest.mark.parametrize("name", ["cnn", "lenet", "mlp"])
def test_pruning_removes_channels_and_rebuild_makes_the_same_network(name):
    torch.manual_seed(0)
    spec = _spec(name)
    teacher = rebuild(spec).eval()
    pruned_spec, state = compression.prune(teacher, spec, PruneConfig(sparsity=0.5))
    assert pruned_spec.layers and pruned_spec.to_dict()["layers"] == pruned_spec.layers
    model = rebuild(ModelSpec.from_dict(pruned_spec.to_dict()))  # as read back from a file
    model.load_state_dict(state)  # strict: every shape as recorded
    params = sum(p.numel() for p in model.parameters())
    assert params < 0.6 * sum(p.numel() for p in teacher.parameters())
    assert _size(state) < 0.6 * _size(teacher.state_dict())
    assert all(torch.count_nonzero(p) > 0.9 * p.numel() for p in model.parameters() if p.dim() > 1)
    x = torch.rand(3, *spec.shape) * 255
    assert model.eval()(x).shape == (3, 10)  # the output layer keeps its classes


def test_a_parameter_budget_prunes_until_within_it_and_an_impossible_one_is_refused():
    spec = _spec("lenet")
    teacher = rebuild(spec)
    pruned, _ = compression.prune(teacher, spec, PruneConfig(max_params=30_000))
    within = sum(p.numel() for p in rebuild(pruned).parameters())
    assert 15_000 < within <= 30_000  # stopped at the first 5 % step inside the budget
    with pytest.raises(ConfigError, match=r"compress.prune: .*over the budget \(max_params 10"):
        compression.prune(teacher, spec, PruneConfig(max_params=10))


def test_the_distillation_loss_is_soft_kl_times_t_squared_plus_hard_cross_entropy():
    torch.manual_seed(0)
    teacher = rebuild(_spec("mlp", (1, 4, 4), 8))
    x, y = torch.rand(5, 1, 4, 4) * 255, torch.randint(0, 10, (5,))
    logits = torch.randn(5, 10, requires_grad=True)
    hard = compression.distillation_loss(teacher, 4.0, 0.0, 0.0)(logits, y, x)
    assert torch.allclose(hard, F.cross_entropy(logits, y))
    soft = compression.distillation_loss(teacher, 4.0, 1.0, 0.0)(logits, y, x)
    target = F.softmax(teacher(x) / 4.0, 1)
    expected = 16.0 * (target * (target.log() - F.log_softmax(logits / 4.0, 1))).sum(1).mean()
    assert torch.allclose(soft, expected, atol=1e-5)
    soft.backward()
    assert logits.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_int8_onnx_keeps_the_input_contract_and_the_spec_and_loads_by_kind(tmp_path):
    from pipeline.tracking.weights import read_weights

    torch.manual_seed(0)
    spec = _spec("lenet")
    model = rebuild(spec).eval()
    float_path = runtime.export(model, spec, tmp_path / "float.onnx")
    images = np.random.default_rng(0).integers(0, 256, (64, *spec.shape)).astype(np.float32)
    int8 = compression.quantize(float_path, tmp_path / "model.onnx", images, per_channel=True)
    runtime.stamp(int8, spec, "int8")
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*prepared*"))
    assert runtime.file_bytes(int8) < runtime.file_bytes(float_path) / 3

    loaded, loaded_spec = read_weights(int8)
    assert isinstance(loaded, runtime.OnnxModel) and loaded.precision == "int8"
    assert loaded_spec == spec and loaded_spec.input_contract() == spec.input_contract()
    session = loaded.session.get_inputs()[0]
    assert (session.name, session.type, session.shape[1:]) == (
        "pixels",
        "tensor(float)",
        [1, 28, 28],
    )
    x = torch.from_numpy(images[:7])  # any batch size
    with torch.no_grad():
        close = torch.nn.functional.cosine_similarity(loaded(x), model(x), dim=1)
    assert loaded(x).shape == (7, 10) and close.min() > 0.95

    figures = efficiency.figures(loaded, loaded_spec, int8)
    assert figures["params"] == sum(p.numel() for p in model.parameters())
    assert figures["macs"] == efficiency.figures(model, spec, float_path)["macs"]
    assert figures["model_bytes"] == int8.stat().st_size


def test_file_bytes_counts_an_onnx_models_external_data(tmp_path):
    spec = _spec("lenet")
    path = tmp_path / "external.onnx"
    torch.onnx.export(
        rebuild(spec).eval(), (torch.zeros(2, *spec.shape),), str(path), dynamo=True,
        external_data=True, verbose=False,
    )  # fmt: skip
    data = list(tmp_path.glob("external.onnx.data"))
    assert data and runtime.file_bytes(path) == path.stat().st_size + data[0].stat().st_size


def test_speed_reports_latency_percentiles_and_throughput():
    model = rebuild(_spec("mlp", (1, 8, 8), 16))
    measured = efficiency.speed(model, (1, 8, 8), runs=20)
    assert 0 < measured["latency_p50_ms"] <= measured["latency_p95_ms"]
    assert measured["throughput"] > 0
