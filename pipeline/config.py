"""Typed configuration loaded from params.yaml plus `key=value` overrides.

Every block rejects unknown keys, wrong types and impossible values before any work starts, and
the error names the offending key and what is allowed. The field defaults equal params.yaml's
values (tests/unit/test_config.py fails when they drift apart); they exist so a config recorded
by an older run still validates after a key is added.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline import choices
from pipeline.errors import ConfigError

# The allowed names come from the one table of each kind (pipeline/choices.py).
DatasetName = Literal[choices.names(choices.DATASETS)]
ModelName = Literal[choices.names(choices.MODELS)]
OptimizerName = Literal[choices.names(choices.OPTIMIZERS)]
ScheduleName = Literal[choices.names(choices.SCHEDULES)]
StrategyName = Literal[choices.names(choices.SWEEP_STRATEGIES)]
CompressionName = Literal[choices.names(choices.COMPRESSIONS)]
AttributionName = Literal[choices.names(choices.ATTRIBUTIONS)]


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseConfig(_Block):
    seed: int = 42  # drives python, numpy and torch RNGs (data order, init, dropout, augmentation)
    dataset: DatasetName = "digits"
    preset: str | None = None  # a name under `presets:`; its keys apply before any --set


class DataConfig(_Block):
    test_fraction: float = Field(0.2, gt=0, lt=1)
    source_dir: str | None = None  # raw files (mnist/cifar) or class folders (imagefolder)
    download: bool = True  # without source_dir: fetch the raw files into download_dir
    download_dir: str | None = None  # null: .cache/datasets in the project
    image_size: int | None = Field(None, ge=4)  # imagefolder only: bring every image to a square
    resize: Literal["crop", "squash", "pad"] = "crop"  # how image_size is reached (imagefolder)
    on_bad_image: Literal["fail", "skip"] = "fail"  # skip: left out, listed in data/meta.json
    workers: int | None = Field(None, ge=1)  # imagefolder decoding processes; null: one per core
    background: str = "white"  # transparency is composited onto it (a color name or #rrggbb)
    # Larger images are bad images (decompression bombs); Pillow refuses twice its own default.
    max_image_pixels: int = Field(89_478_485, ge=1, le=178_956_970)

    @field_validator("background")
    @classmethod
    def _a_color(cls, value: str) -> str:
        from PIL import ImageColor  # here: the DAG files import this module, keep it light

        try:
            ImageColor.getrgb(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a color: use a name or #rrggbb") from None
        return value


class ValidateConfig(_Block):
    min_rows_per_split: int = Field(50, ge=1)
    # The class names the dataset must declare, in order; null = any set of at least two.
    classes: list[str] | None = Field(None, min_length=2)
    pixel_min: float = 0
    pixel_max: float = 255
    # Share of a split's pixels at exactly 0 / 255 (mean over images); above it the split looks
    # clipped (e.g. 16-bit images cut at 255). null = off.
    max_share_at_0: float | None = Field(0.95, gt=0, le=1)
    max_share_at_255: float | None = Field(0.5, gt=0, le=1)
    max_class_ratio: float = Field(2.0, ge=1)  # largest / smallest class count in a split
    # Drift bound, in pixel units: each split's mean pixel value and mean image contrast (per-image
    # std) against the champion's training data; null = off. Not checked before a champion exists.
    drift_max_shift: float | None = Field(10.0, gt=0)


class ModelConfig(_Block):
    name: ModelName = "cnn"
    hidden: int = Field(128, ge=1)  # MLP hidden width / CNN base channel count x 4 (not resnet18)
    dropout: float = Field(0.0, ge=0, lt=1)


class OptimizerConfig(_Block):
    name: OptimizerName = "adamw"
    lr: PositiveFloat | Literal["auto"] = 0.003  # auto: the lr range test picks it (lr-find)
    weight_decay: float = Field(0.01, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd, rmsprop
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov: true needs name: sgd and momentum > 0")
        return self


class ScheduleConfig(_Block):
    name: ScheduleName = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)  # linear warmup from 0, in (fractional) epochs
    gamma: float = Field(0.5, gt=0, le=1)  # exponential (per epoch), step, multistep
    step_size: int = Field(5, ge=1)  # step: epochs between decays
    milestones: list[int] = Field(default_factory=lambda: [6, 9])  # multistep: epochs
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor, as a fraction of lr
    pct_start: float = Field(0.3, gt=0, lt=1)  # onecycle: share of steps spent rising
    div_factor: float = Field(25.0, ge=1)  # onecycle: start lr = lr / div_factor
    final_div_factor: float = Field(1e4, ge=1)  # onecycle: end lr = start lr / final_div_factor


class AugmentConfig(_Block):
    """Applied on the device to whole batches, train split only."""

    crop_padding: int = Field(0, ge=0)  # random crop after zero-padding by this many pixels
    flip: bool = False  # random horizontal flip (CIFAR-like photos; not digits)


class EarlyStoppingConfig(_Block):
    patience: int = Field(0, ge=0)  # epochs without val_loss improvement; 0 = off
    min_delta: float = Field(0.0, ge=0)  # smaller improvements do not count


class CudaConfig(_Block):
    """Speed switches that only apply on a CUDA device; ignored on CPU."""

    amp: Literal["bf16", "fp16", "off"] = "bf16"  # autocast dtype; fp16 adds a grad scaler
    channels_last: bool = True
    tf32: bool = True  # TF32 matmuls/convolutions on Ampere and newer
    fused_optimizer: bool = True
    compile: bool = False  # torch.compile the model (slower start, faster steps)


MAX_EPSILON = 100.0  # train.privacy spends at most this: beyond it, no guarantee to speak of


class PrivacyConfig(_Block):
    """DP-SGD (Abadi et al. 2016) through Opacus: Poisson-sampled batches, each example's
    gradient clipped to `max_grad_norm`, Gaussian noise of noise_multiplier x max_grad_norm
    added; the accountant turns them into the (epsilon, delta) guarantee."""

    enabled: bool = False
    noise_multiplier: float | None = Field(None, gt=0, allow_inf_nan=False)  # sigma; or:
    # the sigma that reaches it is solved for; above 100 (e^100) there is no guarantee to speak
    # of, and Opacus's solver runs for hours on the vanishing sigmas it would need
    target_epsilon: float | None = Field(None, gt=0, le=MAX_EPSILON)
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=False)  # per-example gradient clip
    delta: float | None = Field(None, gt=0, lt=1)  # null: min(1e-5, 1 / (10 N)); < 1 / N
    # Not Opacus's "gdp": it underestimates epsilon (its own warning), and the gate trusts it.
    accountant: Literal["prv", "rdp"] = "prv"

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacyConfig:
        given = [self.noise_multiplier is not None, self.target_epsilon is not None]
        if self.enabled and sum(given) != 1:
            raise ValueError(
                "train.privacy needs exactly one of noise_multiplier (sigma, e.g. 1.0) and "
                "target_epsilon (e.g. 8)"
            )
        if not self.enabled and any(given):
            print(
                "warning: train.privacy.enabled is false, so its noise_multiplier / "
                "target_epsilon are ignored and the model has no privacy guarantee; set "
                "train.privacy.enabled=true to train with DP-SGD",
                file=sys.stderr,
            )
        return self


class TrainConfig(_Block):
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    augment: AugmentConfig = AugmentConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    cuda: CudaConfig = CudaConfig()
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(64, ge=1)  # per process when data-parallel
    val_fraction: float = Field(0.1, ge=0, lt=1)  # carved from train; test stays untouched
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(0.0, ge=0)  # max global gradient norm; 0 = off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loader: Literal["auto", "resident", "stream"] = "auto"  # auto: resident when it fits
    resident_max_mb: int = Field(1024, ge=0)  # auto on CPU: keep at most this much in memory
    deterministic: bool = False  # deterministic algorithms (slower on GPU)
    max_bad_steps: int = Field(10, ge=1)  # a NaN/Inf loss stops training within this many steps
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _early_stopping_needs_validation(self) -> TrainConfig:
        if self.early_stopping.patience and not self.val_fraction:
            raise ValueError("early_stopping.patience > 0 needs train.val_fraction > 0")
        return self

    @model_validator(mode="after")
    def _privacy_clips_per_example(self) -> TrainConfig:
        if self.privacy.enabled and self.grad_clip:
            raise ValueError(
                "train.grad_clip is off under train.privacy: each example's gradient is clipped "
                "to train.privacy.max_grad_norm instead; set train.grad_clip=0"
            )
        if self.privacy.enabled and self.model.name == "resnet18":
            raise ValueError(
                "train.model.name=resnet18 cannot train under train.privacy: torchvision's "
                "residual blocks add in place onto a layer's output, which Opacus's "
                "per-example gradient hooks forbid; use cnn, lenet or mlp"
            )
        if self.privacy.enabled and self.optimizer.lr == "auto":
            raise ValueError(
                "train.optimizer.lr=auto is not run under train.privacy: the range test trains "
                "on the data without DP-SGD, outside the epsilon; set a number (e.g. 0.1 with "
                "sgd)"
            )
        return self


class RegisterConfig(_Block):
    """The promotion policy: both models are scored on the challenger's test data."""

    model_name: str = Field("image-classifier", min_length=1)

    @field_validator("model_name")
    @classmethod
    def _one_word(cls, value: str) -> str:
        from pipeline.files import safe_name

        return safe_name(value, "register.model_name")

    metric: Literal["test_accuracy", "test_macro_f1"] = "test_accuracy"
    floor: float = Field(0.9, ge=0, le=1)  # a model below this is never champion
    min_improvement: float = Field(0.0, ge=0, le=1)  # over the champion; 0 = ties promote
    max_recall_drop: float | None = Field(None, ge=0, le=1)  # per class vs champion; null = off
    promote_experiments: bool = False  # a `dvc exp run` may move champion; false: challenger only
    # Efficiency (docs/training.md): a challenger that does not beat the champion may still take
    # it when it stays within max_accuracy_drop of its metric and is min_size_ratio times smaller
    # (parameters or file bytes) with min_macs_ratio times fewer MACs. null = off.
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)
    min_size_ratio: float = Field(2.0, ge=1)
    min_macs_ratio: float = Field(1.0, ge=1)  # 1: no more MACs (int8 keeps its float MACs)
    # Refuse a challenger whose DP-SGD epsilon (train.privacy) is above this, or that has none.
    max_epsilon: float | None = Field(None, gt=0)  # null = off


class DistillConfig(_Block):
    """Knowledge distillation (Hinton et al. 2015): a student trained on the teacher's softened
    outputs; the rest of the recipe is train's."""

    student: ModelConfig = ModelConfig(name="lenet", hidden=32)
    temperature: float = Field(4.0, gt=0)  # softens both outputs; the KL term is scaled by T^2
    alpha: float = Field(0.9, ge=0, le=1)  # weight of the KL to the teacher; 1 - alpha: labels
    epochs: int | None = Field(None, ge=1)  # null: the teacher's epochs


class PruneConfig(_Block):
    """Structured pruning (Torch-Pruning): whole channels and units removed, then fine-tuned."""

    sparsity: float = Field(0.5, gt=0, lt=1)  # share of every prunable layer's channels removed
    max_params: int | None = Field(None, ge=1)  # a budget instead: prune until at most this many
    max_macs: int | None = Field(None, ge=1)  # ... or at most this many multiply-adds per image
    epochs: int = Field(2, ge=1)  # fine-tuning epochs
    lr_scale: float = Field(1.0, gt=0, le=1)  # fine-tuning lr = the teacher's lr x lr_scale


class QuantizeConfig(_Block):
    """int8 for CPU serving: ONNX export, ONNX Runtime static quantization."""

    calibration_images: int = Field(512, ge=1)  # training images that set activation ranges
    per_channel: bool = True  # one weight scale per output channel (more accurate)


class CompressConfig(_Block):
    """The compress stage: smaller, faster challengers made from a teacher."""

    methods: list[CompressionName] = []  # any of `pipeline choices`; [] = the stage does nothing
    teacher: str | None = None  # null: the train stage's run; or NAME@ALIAS, NAME/VERSION
    # each result goes through the promotion policy as a challenger
    register_: bool = Field(True, alias="register")
    latency_runs: int = Field(200, ge=10)  # timed batch-1 calls for latency p50 / p95
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("methods")
    @classmethod
    def _once_each(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"lists a method twice: {methods}")
        return methods


class ExplainConfig(_Block):
    """The explain stage: attributions for a seeded sample of test images per class plus the
    most confident mistakes, toward the predicted class."""

    methods: list[AttributionName] = ["integrated_gradients", "occlusion"]  # [] = off
    per_class: int = Field(2, ge=0)  # seeded test images of each class
    mistakes: int = Field(4, ge=0)  # the most confident mistakes; at most half of max_images
    max_images: int = Field(48, ge=1)  # the budget: CPU time grows linearly with it
    steps: int = Field(32, ge=2)  # integrated_gradients: points on the path from black
    samples: int = Field(200, ge=10)  # kernel_shap / lime: perturbed copies per image
    patch: int | None = Field(None, ge=1)  # occlusion window, superpixel side (px); null: side/8

    @field_validator("methods")
    @classmethod
    def _once_each(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"lists a method twice: {methods}")
        return methods


class SearchParam(_Block):
    """One dimension of the Optuna search space: a `choice`, or a range `low`..`high` (sampled
    log-uniformly with `log: true`; integers when both bounds are)."""

    choice: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> SearchParam:
        if self.choice is not None:
            if not self.choice or self.low is not None or self.high is not None:
                raise ValueError("give a non-empty `choice`, or `low` and `high`, not both")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"needs low < high (got low {self.low}, high {self.high})")
        elif self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self


def _default_space() -> dict[str, SearchParam]:
    return {
        "train.optimizer.name": SearchParam(choice=["sgd", "adamw"]),
        "train.optimizer.lr": SearchParam(low=1e-4, high=0.3, log=True),
        "train.optimizer.weight_decay": SearchParam(low=1e-5, high=0.1, log=True),
        "train.schedule.name": SearchParam(choice=["cosine", "onecycle"]),
        "train.schedule.warmup_epochs": SearchParam(choice=[0, 1]),
        "train.batch_size": SearchParam(choice=[32, 64, 128]),
        "train.label_smoothing": SearchParam(low=0.0, high=0.2),
    }


class OptunaConfig(_Block):
    """sweep.strategy: optuna: a seeded TPE study with a pruner fed each epoch's val_loss."""

    trials: int = Field(12, ge=1)  # the study's size, over all workers
    workers: int = Field(2, ge=1)  # mapped trial tasks pulling from the study
    study: str | None = None  # null: sweep-<dataset>; re-running resumes the study of this name
    seed: int = 0
    # random trials (finished or pruned) before TPE models the results; Optuna's default of 10
    # would leave a 12-trial study mostly random
    startup_trials: int = Field(4, ge=0)
    pruner: Literal["hyperband", "successive_halving", "none"] = "hyperband"
    space: dict[str, SearchParam] = Field(default_factory=_default_space, min_length=1)


class SweepConfig(_Block):
    """The sweep DAG: `grid` trains every optimizer x schedule x lr, `optuna` searches a space."""

    strategy: StrategyName = "grid"

    optimizers: list[OptimizerName] = Field(default_factory=lambda: ["sgd", "adamw"], min_length=1)
    schedules: list[ScheduleName] = Field(
        default_factory=lambda: ["cosine", "onecycle"], min_length=1
    )
    lrs: list[float] = Field(default_factory=lambda: [0.01, 0.003], min_length=1)
    epochs: int = Field(6, ge=1)  # per trial (optuna: the most a trial runs before pruning)
    register_best: bool = False  # put the best trial through the normal promotion policy
    optuna: OptunaConfig = OptunaConfig()

    @model_validator(mode="after")
    def _positive_lrs(self) -> SweepConfig:
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError("sweep.lrs must all be > 0")
        return self


class ServeConfig(_Block):
    """`pipeline serve`: batching and the limits that bound a request's memory and time."""

    # Finite, bounded values only: an infinite timeout or wait would turn a protection off.
    poll_s: float = Field(10.0, gt=0, le=86_400, allow_inf_nan=False)  # registry checks, seconds
    max_batch: int = Field(128, ge=1)  # images scored together from concurrent requests
    max_wait_ms: float = Field(2.0, ge=0, le=1000, allow_inf_nan=False)  # for requests decoding
    max_images: int = Field(256, ge=1)  # per request; more is refused with 413
    max_body_mb: float = Field(32.0, gt=0, le=1024, allow_inf_nan=False)  # 413: read, dropped
    header_timeout_s: float = Field(10.0, gt=0, le=600, allow_inf_nan=False)  # request head
    body_timeout_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)  # reading a body
    max_in_flight: int = Field(128, ge=1)  # /invocations requests at once; more get 503
    abstain: bool = False  # answer "unknown" when the prediction is not trustworthy
    alpha: float = Field(0.05, gt=0, lt=1)  # prediction sets hold the true class >= 1 - alpha
    ood_rate: float = Field(0.01, gt=0, lt=1)  # in-distribution images flagged as unlike them
    workers: int = Field(1, ge=1, le=64)  # processes, each with its model, batcher and limits


class MonitorConfig(_Block):
    """What the champion is asked: the prediction log (docs/monitoring.md)."""

    log: bool = True  # record scored images of `pipeline serve` and `pipeline predict`
    sample_rate: float = Field(1.0, gt=0, le=1)  # share of scored images recorded (refusals: all)
    store: str = ""  # "": Parquet files under outputs/monitor/; postgresql://...: a table
    buffer: int = Field(10_000, ge=1)  # rows waiting to be written; more are dropped, counted


class TrackingConfig(_Block):
    experiment: str = Field("image-classifier", min_length=1)


class Config(_Block):
    base: BaseConfig = BaseConfig()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    train: TrainConfig = TrainConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()
    compress: CompressConfig = CompressConfig()
    explain: ExplainConfig = ExplainConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    presets: dict[str, dict[str, Any]] = {}  # name -> {dotted.key: value}

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _search_space_keys_exist(self) -> Config:
        for key in self.sweep.optuna.space:
            model: Any = Config
            for part in key.split("."):
                fields = {f.alias or name: f for name, f in model.model_fields.items()}
                annotation = getattr(fields.get(part), "annotation", None)
                if part not in fields or (
                    part != key.split(".")[-1] and not isinstance(annotation, type)
                ):
                    raise ValueError(
                        f"sweep.optuna.space: unknown key {key!r} (no {part!r} there; keys are "
                        "dotted like --set, e.g. train.optimizer.lr)"
                    )
                model = annotation
        return self

    @model_validator(mode="after")
    def _preset_exists(self) -> Config:
        if self.base.preset is not None and self.base.preset not in self.presets:
            raise ValueError(
                f"base.preset {self.base.preset!r} is not defined; "
                f"presets: {', '.join(sorted(self.presets)) or 'none'}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params (one compare-view column per key)."""
        return _flatten(
            {
                k: v
                for k, v in self.to_dict().items()
                if k not in ("presets", "sweep", "compress", "explain", "serve")
            }
        )

    def params_hash(self) -> str:
        """Hash of what determines the trained model (tracking/register do not)."""
        relevant = {k: v for k, v in self.to_dict().items() if k in ("base", "data", "train")}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.epochs=3", "train.optimizer.name=sgd"]` -> {"train.epochs": 3, ...}."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not KEY=VALUE (e.g. train.epochs=5)")
        overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return overrides


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load params.yaml, apply dotted-key overrides and validate the result."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; run from the project root or pass --params") from None
    except DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of blocks (base, data, train, ...)")
    return config_from_dict(raw, overrides)


class DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key written twice in one block is an error (YAML keeps the last one
    silently; DVC refuses the file): the user meant one of the two."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # YAML's own checks word the odd keys
            if key in seen:
                raise DuplicateKey(
                    f"key {key!r} is written twice in one block (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}); keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """Layers, later wins: `raw` (params.yaml), then the selected preset, then `overrides`."""
    raw = json.loads(json.dumps(raw))  # deep copy; overrides must not leak into the caller's dict
    overrides = overrides or {}
    preset = overrides.get("base.preset", (raw.get("base") or {}).get("preset"))
    presets = raw.get("presets") or {}
    layers = {}
    if isinstance(preset, str) and isinstance(presets.get(preset), dict):
        layers.update(presets[preset])
    layers.update(overrides)
    for key, value in layers.items():
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def resolved_config(resolved: dict[str, Any]) -> Config:
    """A config that was already layered (`Config.to_dict()`, handed between DAG tasks or kept
    with a run): validated as is, so its preset is not applied a second time over the overrides."""
    try:
        return Config.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a block")
        node = child
    node[leaf] = value


def _explain(exc: ValidationError) -> str:
    lines, unions = ["invalid configuration:"], {}
    for err in exc.errors():
        loc = list(err["loc"])
        while loc and _is_branch(loc[-1]):  # a union's member (a number, or "auto"): one line
            loc.pop()
        key = ".".join(str(p) for p in loc)
        if len(loc) < len(err["loc"]):
            unions.setdefault(key, ([], err.get("input")))[0].append(err["msg"])
            continue
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(err["loc"][:-1]))
            lines.append(f"  {key}: unknown key; allowed keys here: {allowed}")
        elif not key:  # a cross-field check on the whole config: its message names the keys
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        elif isinstance(err.get("input"), dict):  # a check across a block: its message names keys
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    for key, (messages, given) in unions.items():
        either = ", or ".join(m[0].lower() + m[1:] for m in messages)
        lines.append(f"  {key}: {either} (got {given!r})")
    return "\n".join(lines)


def _is_branch(part) -> bool:
    """pydantic names a union's members in the error's location ("constrained-float",
    "literal['auto']", "int"); params.yaml keys are words joined by underscores."""
    return isinstance(part, str) and (
        any(c in part for c in "-[(") or part in {"int", "float", "str", "bool", "none"}
    )


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return [f.alias or name for name, f in model.model_fields.items()]
