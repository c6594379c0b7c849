"""K-FAC factors, inversion and the optax transformation."""

from kfac_jax_peft.kfac.transform import KFACState, LayerState, kfac_precondition

__all__ = ["KFACState", "LayerState", "kfac_precondition"]
