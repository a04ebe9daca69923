"""The harness: paper experiments as configs over the public core API.

| module | holds |
|---|---|
| `config.py` | the one experiment schema (tasks, cells, methods, variants, selection, cost in n, counterfactual) |
| `tasks.py` | prepare data + base model + ground truth (LM pretraining pool, classifiers), resumable |
| `methods.py` | the one method registry (STRIDE and every baseline) |
| `sweep.py` | STRIDE variants sharing fits and measurements, never mutating a live `Stride` |
| `runner.py` | one method in this process or isolated (seconds per stage, measured peak memory) |
| `report.py` | json + markdown + png |
| `experiment.py` | `run(cfg, out)`: all of the above for one config |
| `counterfactual.py` | remove the top-k attributed examples, retrain, measure the query |

    from stride_jax.harness import load_config, run
    run(load_config("experiments/configs/pretrain_lds.yaml"), "runs/pretrain")
"""

from __future__ import annotations

from pathlib import Path

from stride_jax.config import load_config_file
from stride_jax.harness.config import ExperimentConfig
from stride_jax.harness.experiment import run

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BUILTIN = ("demo", "quick")


def load_config(path_or_name: str | Path) -> ExperimentConfig:
    """An experiment config from a YAML/JSON file, or a built-in one by name ("demo", "quick")."""
    if str(path_or_name) in BUILTIN:
        path_or_name = CONFIG_DIR / f"{path_or_name}.yaml"
    return ExperimentConfig.from_dict(load_config_file(path_or_name))


__all__ = ["BUILTIN", "CONFIG_DIR", "ExperimentConfig", "load_config", "run"]
