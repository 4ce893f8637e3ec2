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

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from pcamx.evaluation.metrics import SELECT_METRICS

# StrEnum: a value reads, compares, formats and serializes as its plain string ("cuda" == Device.cuda).
SelectMetric = StrEnum("SelectMetric", {name: name for name in SELECT_METRICS})


class DataName(StrEnum):
    pcam = "pcam"
    synthetic = "synthetic"


class Architecture(StrEnum):
    tiny = "tiny"
    vits16 = "vits16"


class MethodName(StrEnum):
    head_only = "head_only"
    lora = "lora"
    fullft = "fullft"


class NormsBias(StrEnum):
    none = "none"
    norms = "norms"
    bias = "bias"
    both = "both"


class PruneMethod(StrEnum):
    none = "none"
    heads = "heads"
    mlp = "mlp"
    svd = "svd"
    blocks = "blocks"
    all = "all"


class PruneStep(StrEnum):
    heads = "heads"
    mlp = "mlp"
    svd = "svd"
    blocks = "blocks"


class PruneCriterion(StrEnum):
    weight = "weight"
    activation = "activation"
    taylor = "taylor"


class QuantMode(StrEnum):
    none = "none"
    bf16 = "bf16"
    int8 = "int8"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"


class Calibration(StrEnum):
    none = "none"
    temperature = "temperature"


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
class MethodConfig:
    name: MethodName = MISSING
    lr_head: float | None = MISSING
    wd_head: float | None = MISSING


@dataclass
class NormsBiasConfig(MethodConfig):
    lr_norms_bias: float | None = MISSING
    wd_norms_bias: float | None = MISSING
    train_norms_bias: NormsBias = MISSING


@dataclass
class HeadOnlyConfig(NormsBiasConfig):
    pass


@dataclass
class LoraConfig(NormsBiasConfig):
    lr_lora: float | None = MISSING
    wd_lora: float | None = MISSING
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    lora_a_std: float | None = MISSING
    targets: list[str] = MISSING
    include_mlp: bool = MISSING


@dataclass
class FullFTConfig(MethodConfig):
    lr_backbone: float | None = MISSING
    wd_backbone: float | None = MISSING


@dataclass
class PruneConfig:
    method: PruneMethod = MISSING
    tau: Any = MISSING  # one τ for every step, or a mapping {step: τ}
    order: list[PruneStep] = MISSING
    svd_targets: Any = MISSING  # a list of linear names, or "all"
    criterion: PruneCriterion = MISSING
    scope: str = MISSING  # layer | global (checked by compress.plan: `global` cannot be an enum member name)
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


# Group options whose keys differ from the group's base schema: conf/<group>/<option>.yaml builds on
# `<option>_schema`. (Every other group's options share the node type PcamxConfig gives them.)
OPTION_SCHEMAS: dict[str, dict[str, type]] = {
    "data": {"synthetic": SyntheticDataConfig},
    "method": {"head_only": HeadOnlyConfig, "lora": LoraConfig, "fullft": FullFTConfig},
}


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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
