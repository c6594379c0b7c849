"""K-FAC: the layers and their factor keys, the stages, and the optax transformation.

* :mod:`~kfac_jax_peft.kfac.layers`: which leaves are layers, factor keys;
* :mod:`~kfac_jax_peft.kfac.factors`: normalisation and moving averages;
* :mod:`~kfac_jax_peft.kfac.inverse`: damping modes, decompositions, the
  preconditioned direction of one layer;
* :mod:`~kfac_jax_peft.kfac.stages`: the pure stages on the per-factor state;
* :mod:`~kfac_jax_peft.kfac.ekfac`: EKFAC's diagonal stage, :func:`ekfac_probes`;
* :mod:`~kfac_jax_peft.kfac.spread`: inversions spread over a device mesh,
  factor state sharded over it;
* :mod:`~kfac_jax_peft.kfac.transform`: :func:`kfac_precondition`, which
  composes them.
"""

from kfac_jax_peft.kfac import stages
from kfac_jax_peft.kfac.ekfac import ekfac_probes
from kfac_jax_peft.kfac.layers import LayerSpec, default_layer_filter, path_str
from kfac_jax_peft.kfac.multi_steps import MultiStepsStatsState, multi_steps
from kfac_jax_peft.kfac.spread import kfac_state_shardings
from kfac_jax_peft.kfac.stages import FactorState, LayerState
from kfac_jax_peft.kfac.transform import KFACState, describe, kfac_precondition, kfac_state

__all__ = ["FactorState", "KFACState", "LayerSpec", "LayerState", "default_layer_filter",
           "describe", "ekfac_probes", "kfac_precondition", "kfac_state",
           "kfac_state_shardings", "multi_steps",
           "MultiStepsStatsState", "path_str", "stages"]
