"""Entry point: `python run.py [group=option ...] [key=value ...]`. All logic lives in pcamx/."""

import hydra
from omegaconf import DictConfig

import pcamx.config  # noqa: F401  (registers the typed config schema before Hydra composes)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from pcamx.pipeline import run_job

    return run_job(cfg)  # metrics.json's content: what a search sweeper reads its objectives from


if __name__ == "__main__":
    main()
