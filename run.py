"""Entry point: `python run.py [group=option ...] [key=value ...]`. All logic lives in pcamx/."""

import hydra
from omegaconf import DictConfig

import pcamx.config  # noqa: F401  (registers the typed config schema before Hydra composes)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pcamx.pipeline import run_job

    run_job(cfg)


if __name__ == "__main__":
    main()
