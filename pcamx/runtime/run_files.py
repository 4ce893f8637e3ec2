"""What a run directory and a sweep directory hold: every file name, once. Writers and readers import them."""

from __future__ import annotations

from pathlib import Path

# A run directory (outputs/<date>/<time>, or <sweep dir>/<job number>).
METRICS = "metrics.json"  # every run writes it: ok, failed or interrupted
PREDICTIONS = "predictions.csv"  # index,label,prob of every test patch
RESOLVED_CONFIG = "resolved_config.yaml"  # the config the run ran with, interpolations resolved
ROC = "roc.png"
CALIBRATION = "calibration.png"
BEST = "best.pt"  # best validation weights (adapters merged)
LAST = "last.pt"  # the weights at the end of training
TRAIN_CHECKPOINTS = (BEST, LAST)
RESUME = "resume.pt"  # the resumable training state, removed when the run finishes
COMPRESSED = "compressed"  # the compressed model: a directory
LOCK = ".pcamx.lock"  # held by the run that owns the directory
HYDRA_DIR = ".hydra"  # Hydra's own record of the job
HYDRA_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"
HYDRA_CONFIG = Path(HYDRA_DIR) / "config.yaml"

# A compressed model's directory.
WEIGHTS = "model.safetensors"
ARCHITECTURE = "architecture.json"

# A sweep directory: the comparison of its runs (pcamx.report).
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
FRONTIER = "frontier.png"
SWEEP_FIGURES = (ROC, CALIBRATION, FRONTIER)
# A search's sweep directory also holds its study and results (hydra/sweeper=optuna).
OPTUNA_JOURNAL = "optuna.journal"
OPTUNA_RESULTS = "optimization_results.yaml"
TRIALS_CSV = "trials.csv"
