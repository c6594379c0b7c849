"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

An adapter maps ``x [..., d]`` to ``x + up(act(down(x)))`` with
``down: d -> d // reduction_factor`` and ``up`` initialised to zero, so a new
adapter is the identity. ``down`` and ``up`` are
:class:`~kfac_jax_peft.capture.KFACDense` (with bias) and record K-FAC
statistics.

Placement in a transformer block (the model decides, see
:func:`adapter_sites`): ``"houlsby"`` puts one adapter after the attention
output projection and one after the feed-forward output projection (each
before its residual connection and LayerNorm); ``"pfeiffer"`` only the
feed-forward one. Modules are named ``adapter_attention`` and
``adapter_ffn`` (every name starting with ``adapter`` is trainable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfac_jax_peft.capture import KFACDense

Array = jax.Array

PLACEMENTS = ("houlsby", "pfeiffer")

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapter hyper-parameters.

    Attributes:
      reduction_factor: bottleneck width is ``max(1, d // reduction_factor)``.
      activation: a key of :data:`ACTIVATIONS`.
      placement: ``"houlsby"`` (after attention and feed-forward) or
        ``"pfeiffer"`` (after feed-forward only).
    """

    reduction_factor: int = 16
    activation: str = "relu"
    placement: str = "houlsby"

    def __post_init__(self):
        if self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {self.activation!r}; "
                             f"expected one of {tuple(ACTIVATIONS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown adapter placement {self.placement!r}; "
                             f"expected one of {PLACEMENTS}")

    def to_dict(self) -> dict:
        """JSON-serialisable form (``AdapterConfig(**d)`` inverts it)."""
        return dataclasses.asdict(self)


def adapter_sites(config: AdapterConfig | None) -> tuple[str, ...]:
    """Sites of a transformer block that get an adapter: a subset of
    ``("attention", "ffn")``."""
    if config is None:
        return ()
    return ("attention", "ffn") if config.placement == "houlsby" else ("ffn",)


class Adapter(nn.Module):
    """``x + up(act(down(x)))``; ``mask`` (token mask of ``x``'s leading
    shape) keeps padding out of the K-FAC statistics."""

    config: AdapterConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        d = x.shape[-1]
        width = max(1, d // self.config.reduction_factor)
        h = KFACDense(width, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.lecun_normal(), name="down")(x, mask)
        h = ACTIVATIONS[self.config.activation](h)
        h = KFACDense(d, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.zeros_init(), name="up")(h, mask)
        return x + h.astype(x.dtype)
