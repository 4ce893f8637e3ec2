"""`hydra/sweeper=optuna`: a Hydra sweeper on Optuna >= 4 with hydra-optuna-sweeper's keys. Hydra's plugin scan
imports this package; importing config registers the options."""

from hydra_plugins.pcamx_optuna import config  # noqa: F401
