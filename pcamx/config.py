"""The typed schema of the whole config, registered in Hydra's ConfigStore.

Every YAML file under conf/ builds on these dataclasses (`pcamx_schema`, one `<option>_schema` per group option),
so composition rejects an unknown key, a value of the wrong type and an enum value that does not exist, naming
the allowed ones; every enum is built from the registry it names. The schema holds types and ranges only (every
field is MISSING here): the defaults live in conf/, once. Importing this module registers it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pcamx.compress.chain import METHODS as PRUNE_METHODS
from pcamx.compress.chain import STEPS
from pcamx.compress.importance import CRITERIA
from pcamx.compress.quant import QUANT_MODES
from pcamx.compress.units import SCOPES
from pcamx.data import DATASETS
from pcamx.data.transforms import TTA_VIEWS
from pcamx.evaluation.metrics import SELECT_METRICS
from pcamx.evaluation.uncertainty import CALIBRATIONS
from pcamx.model import ARCHITECTURES
from pcamx.runtime import search  # noqa: F401  (the search presets' resolvers: pcamx.objective, pcamx.direction)
from pcamx.runtime.conf import CONF_DIR, Range, conf_defaults, ranged  # noqa: F401  (conf_defaults: part of the config API)
from pcamx.runtime.errors import ConfigError
from pcamx.runtime.hardware import DEVICES, PRECISIONS
from pcamx.training.methods import METHODS, NORMS_BIAS, MethodConfig


def registry_enum(name: str, registry: Iterable[str]) -> type[StrEnum]:
    """The config enum of a registry's names: a value reads, compares, formats and serializes as its string
    ("cuda" == Device.cuda), and a new registry entry is a new allowed value with nothing else to edit."""
    return StrEnum(name, {key: key for key in registry})


SelectMetric = registry_enum("SelectMetric", SELECT_METRICS)
DataName = registry_enum("DataName", DATASETS)
Architecture = registry_enum("Architecture", ARCHITECTURES)
MethodName = registry_enum("MethodName", METHODS)
NormsBias = registry_enum("NormsBias", NORMS_BIAS)
PruneMethod = registry_enum("PruneMethod", PRUNE_METHODS)
PruneStep = registry_enum("PruneStep", STEPS)
PruneCriterion = registry_enum("PruneCriterion", CRITERIA)
PruneScope = registry_enum("PruneScope", SCOPES)
QuantMode = registry_enum("QuantMode", QUANT_MODES)
Device = registry_enum("Device", DEVICES)
Precision = registry_enum("Precision", PRECISIONS)
Calibration = registry_enum("Calibration", CALIBRATIONS)


@dataclass
class JitterConfig:
    brightness: float = ranged(0)
    contrast: float = ranged(0)
    saturation: float = ranged(0)
    hue: float = ranged(0, 0.5)


@dataclass
class DataConfig:
    name: DataName = MISSING
    root: str = MISSING
    resolution: int = ranged(1)
    mpp: float = ranged(0, lo_open=True)
    batch_size: int = ranged(1)
    eval_batch_size: int = ranged(1)
    limit_train: int = ranged(0)
    limit_val: int = ranged(0)
    limit_test: int = ranged(0)
    augment: bool = MISSING
    jitter: JitterConfig | None = MISSING
    in_memory: bool = MISSING


@dataclass
class SyntheticDataConfig(DataConfig):
    seed: int = MISSING
    n_train: int = ranged(1)
    n_valid: int = ranged(2)
    n_test: int = ranged(2)


@dataclass
class ModelConfig:
    name: str = MISSING
    name_or_path: str | None = MISSING
    architecture: Architecture = MISSING
    config: dict[str, Any] = MISSING


@dataclass
class PruneConfig:
    method: PruneMethod = MISSING
    tau: Any = MISSING  # one τ for every step, or a mapping {step: τ}
    order: list[PruneStep] = MISSING
    svd_targets: Any = MISSING  # a list of linear names, or "all"
    criterion: PruneCriterion = MISSING
    scope: PruneScope = MISSING
    calib_batches: int = ranged(0)
    target_ratio: float | None = ranged(0, 1, lo_open=True)
    target_gflops: float | None = ranged(0, lo_open=True)
    target_params: float | None = ranged(0, lo_open=True)
    heal_epochs: int = ranged(0)


@dataclass
class QuantConfig:
    mode: QuantMode = MISSING


@dataclass
class HardwareConfig:
    device: Device = MISSING
    precision: Precision = MISSING
    compile: bool = MISSING
    num_threads: int | None = ranged(1)


@dataclass
class TrainConfig:
    epochs: int = ranged(1)
    precision: Precision = MISSING
    lr: float = ranged(0, lo_open=True)
    weight_decay: float = ranged(0)
    decay_all_params: bool = MISSING
    warmup_steps: int = ranged(0)
    warmup_zero_start: bool = MISSING
    grad_clip: float = ranged(0)
    label_smoothing: float = ranged(0, 1, hi_open=True)
    max_train_batches: int = ranged(0)
    val_every: float = ranged(0, lo_open=True)
    select_metric: SelectMetric = MISSING
    select_tiebreak: SelectMetric | None = MISSING
    save_best: bool = MISSING
    save_last: bool = MISSING
    checkpoint_every: int = ranged(0)


@dataclass
class EvalConfig:
    precision: Precision = MISSING
    tta: bool = MISSING
    tta_views: int = ranged(choices=tuple(TTA_VIEWS))
    val_tta: bool = MISSING
    measure_speed: bool = MISSING
    speed_warmup: int = ranged(0)
    speed_iters: int = ranged(1)
    bootstrap: int = ranged(0)
    calibrate: Calibration = MISSING


@dataclass
class ReportConfig:
    ci: bool = MISSING


@dataclass
class HealConfig:
    kd_weight: float = ranged(0)
    temperature: float = ranged(0, lo_open=True)
    lr_scale: float = ranged(0, lo_open=True)


@dataclass
class WandbConfig:
    enabled: bool = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    name: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class PcamxConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    prune: PruneConfig = MISSING
    quant: QuantConfig = MISSING
    hardware: HardwareConfig = MISSING
    seed: int = MISSING
    resume: Any = MISSING  # auto | true | false (Hydra parses true/false as booleans)
    checkpoint: str | None = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    heal: HealConfig = MISSING
    report: ReportConfig = MISSING
    wandb: WandbConfig = MISSING


def _typed_method(method: type) -> type:
    """A method's config (training.methods) with its name and train_norms_bias checked against the registries."""
    fields = [("name", MethodName, MISSING)]
    if "train_norms_bias" in {f.name for f in dataclasses.fields(method)}:
        fields.append(("train_norms_bias", NormsBias, MISSING))
    typed = dataclasses.make_dataclass(method.__name__, fields, bases=(method,))
    typed.__module__ = __name__
    return typed


# Group options whose keys differ from the group's base schema: conf/<group>/<option>.yaml builds on
# `<option>_schema`. (Every other group's options share the node type PcamxConfig gives them.)
OPTION_SCHEMAS: dict[str, dict[str, type]] = {
    "data": {"synthetic": SyntheticDataConfig},
    "method": {name: _typed_method(m.config) for name, m in METHODS.items()},
}




def compose(*overrides: str, hydra_config: bool = False) -> DictConfig:
    """The config `python run.py <overrides>` runs with (for the tests and the benchmark)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if not CONF_DIR.is_dir():
        raise FileNotFoundError(f"{CONF_DIR} not found: run from a pcamx checkout (the configs live in conf/)")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra_config)
    check_ranges(cfg)
    return cfg


def check_ranges(cfg: DictConfig, prefix: str = "") -> None:
    """ConfigError naming the key and its allowed range for the first value outside it (see `Range`)."""
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        for f in dataclasses.fields(schema):
            bound = f.metadata.get("range")
            if bound is not None and f.name in cfg and not bound.allows(cfg[f.name]):
                raise ConfigError(f"{prefix}{f.name}={cfg[f.name]!r} is out of range: it must be {bound}")
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and key != "hydra" and not node._is_none() and not node._is_missing():
            check_ranges(cfg[key], f"{prefix}{key}.")


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="pcamx_schema", node=PcamxConfig)
    for group, options in OPTION_SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"{option}_schema", node=schema)


register()
