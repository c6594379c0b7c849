"""GLUE/SuperGLUE fine-tuning: configuration, optimizer arms, the training
loop (on a device mesh; :func:`initialize_distributed` for a job over
several processes), logs and plots."""

from kfac_jax_peft.finetune.config import ARMS, TrainConfig, from_mapping, load_config
from kfac_jax_peft.finetune.devices import initialize_distributed
from kfac_jax_peft.finetune.logs import MetricsLog, read_log
from kfac_jax_peft.finetune.optim import build_optimizer, learning_rate_schedule
from kfac_jax_peft.finetune.steps import Fixed, TrainState, make_steps
from kfac_jax_peft.finetune.trainer import (
    Data,
    RunResult,
    enable_compilation_cache,
    evaluate,
    load_data,
    steps_to_reach,
    train,
)

__all__ = [
    "ARMS",
    "Data",
    "Fixed",
    "MetricsLog",
    "RunResult",
    "TrainConfig",
    "TrainState",
    "build_optimizer",
    "enable_compilation_cache",
    "evaluate",
    "from_mapping",
    "initialize_distributed",
    "learning_rate_schedule",
    "load_config",
    "load_data",
    "make_steps",
    "read_log",
    "steps_to_reach",
    "train",
]
