"""Deprecated location: the metrics moved beside the pipeline that uses them,
:mod:`kfac_jax_peft.finetune.metrics`; this module re-exports them for one
release."""

import warnings

from kfac_jax_peft.finetune.metrics import *  # noqa: F403
from kfac_jax_peft.finetune.metrics import __all__  # noqa: F401

warnings.warn("kfac_jax_peft.metrics moved to kfac_jax_peft.finetune.metrics",
              DeprecationWarning, stacklevel=2)
