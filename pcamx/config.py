"""The typed schema of the whole config, registered in Hydra's ConfigStore.

Every YAML file under conf/ builds on these dataclasses (`pcamx_schema` for the top level, one
`<option>_schema` per group option), so composition itself rejects an unknown key, a value of the wrong
type and an enum value that does not exist, naming the allowed ones:

    python run.py method.train_norms_bias=bothh
    → Invalid value 'bothh', expected one of [none, norms, bias, both]

The schema holds types only (every field is MISSING here): the defaults live in conf/, once. A field that
a YAML file forgets is an error when the run resolves its config. Importing this module registers the
schema; run.py and the tests import it before composing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from pcamx.compress.chain import METHODS as PRUNE_METHODS
from pcamx.compress.chain import STEPS
from pcamx.compress.importance import CRITERIA
from pcamx.compress.quant import QUANT_MODES
from pcamx.compress.units import SCOPES
from pcamx.data import DATASETS
from pcamx.evaluation.metrics import SELECT_METRICS
from pcamx.evaluation.uncertainty import CALIBRATIONS
from pcamx.model import ARCHITECTURES
from pcamx.runtime.conf import CONF_DIR, conf_defaults  # noqa: F401  (conf_defaults: part of the config API)
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
    brightness: float = MISSING
    contrast: float = MISSING
    saturation: float = MISSING
    hue: float = MISSING


@dataclass
class DataConfig:
    name: DataName = MISSING
    root: str = MISSING
    resolution: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    limit_train: int = MISSING
    limit_val: int = MISSING
    limit_test: int = MISSING
    augment: bool = MISSING
    jitter: JitterConfig | None = MISSING
    in_memory: bool = MISSING


@dataclass
class SyntheticDataConfig(DataConfig):
    seed: int = MISSING
    n_train: int = MISSING
    n_valid: int = MISSING
    n_test: int = MISSING


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
    calib_batches: int = MISSING
    target_ratio: float | None = MISSING
    target_gflops: float | None = MISSING
    target_params: float | None = MISSING
    heal_epochs: int = MISSING


@dataclass
class QuantConfig:
    mode: QuantMode = MISSING


@dataclass
class HardwareConfig:
    device: Device = MISSING
    precision: Precision = MISSING
    compile: bool = MISSING
    num_threads: int | None = MISSING


@dataclass
class TrainConfig:
    epochs: int = MISSING
    precision: Precision = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    decay_all_params: bool = MISSING
    warmup_steps: int = MISSING
    warmup_zero_start: bool = MISSING
    grad_clip: float = MISSING
    label_smoothing: float = MISSING
    max_train_batches: int = MISSING
    val_every: float = MISSING
    select_metric: SelectMetric = MISSING
    select_tiebreak: SelectMetric | None = MISSING
    save_best: bool = MISSING
    save_last: bool = MISSING
    checkpoint_every: int = MISSING


@dataclass
class EvalConfig:
    precision: Precision = MISSING
    tta: bool = MISSING
    tta_views: int = MISSING
    val_tta: bool = MISSING
    measure_speed: bool = MISSING
    speed_warmup: int = MISSING
    speed_iters: int = MISSING
    bootstrap: int = MISSING
    calibrate: Calibration = MISSING


@dataclass
class ReportConfig:
    ci: bool = MISSING


@dataclass
class HealConfig:
    kd_weight: float = MISSING
    temperature: float = MISSING
    lr_scale: float = MISSING


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
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="pcamx_schema", node=PcamxConfig)
    for group, options in OPTION_SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"{option}_schema", node=schema)


register()
