"""Low-rank adaptation (LoRA) of frozen dense layers.

Conventions (Flax): a dense kernel is ``[d_in, d_out]`` and ``y = x @ W + b``.
A LoRA layer adds ``scaling * dropout(x) @ A @ B`` with ``A: [d_in, r]`` and
``B: [r, d_out]``; ``B`` starts at zero so an untrained adapter leaves the base
model unchanged. As in Hugging Face ``peft``, dropout acts on the input of
``A``. ``scaling`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

``A`` and ``B`` are :class:`~kfac_jax_peft.capture.KFACDense` sub-modules named
``lora_A`` and ``lora_B``, so they record K-FAC statistics; the frozen base
``kernel``/``bias`` are plain parameters of :class:`PEFTDense` and do not.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfac_jax_peft.capture import KFACDense

Array = jax.Array

ALL_LINEAR = "all-linear"
LORA_INITS = ("kaiming_uniform", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters.

    Attributes:
      rank: the rank ``r`` of the update.
      alpha: numerator of the scaling.
      dropout: dropout rate on the input of ``lora_A`` (training only).
      targets: which :class:`PEFTDense` layers get LoRA. Each entry is either
        ``"all-linear"`` (every PEFTDense layer; classification heads are not
        PEFTDense), a bare name matched against the last component of the
        module path (``"query"``), or an ``fnmatch`` pattern matched against the
        ``/``-joined module path (``"encoder/layer_*/attention/value"``).
      use_rslora: use ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
      init: ``"kaiming_uniform"`` (Hugging Face ``peft``'s default for ``A``:
        uniform on ``+-1/sqrt(d_in)``) or ``"gaussian"`` (normal, std ``1/r``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    use_rslora: bool = False
    init: str = "kaiming_uniform"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.init not in LORA_INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; expected one of {LORA_INITS}")

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        denom = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.alpha / denom

    def to_dict(self) -> dict:
        """JSON-serialisable form (``LoRAConfig(**d)`` inverts it)."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d


def lora_matches(config: LoRAConfig, path: Sequence[str]) -> bool:
    """Whether a layer at module ``path`` (tuple of names) is a LoRA target."""
    if ALL_LINEAR in config.targets:
        return True
    if not path:
        return False
    joined = "/".join(path)
    for pattern in config.targets:
        if "/" not in pattern and fnmatch.fnmatchcase(path[-1], pattern):
            return True
        if fnmatch.fnmatchcase(joined, pattern):
            return True
    return False


def lora_a_init(config: LoRAConfig) -> Callable:
    """Initialiser of ``A`` (kernel ``[d_in, r]``) following Hugging Face peft."""
    if config.init == "gaussian":
        return nn.initializers.normal(stddev=1.0 / config.rank)
    # torch kaiming_uniform_(a=sqrt(5)) on [r, d_in]: bound = 1 / sqrt(d_in)
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class PEFTDense(nn.Module):
    """A frozen dense layer with an optional LoRA update.

    Drop-in for ``nn.Dense``: parameters ``kernel [d_in, features]`` and
    ``bias`` (the frozen base weights). When ``lora`` is set *and* this
    module's path matches ``lora.targets`` (see :func:`lora_matches`), the
    sub-modules ``lora_A`` and ``lora_B`` are added and the output becomes
    ``x @ kernel + bias + scaling * lora_B(lora_A(dropout(x)))``. ``mask`` is
    the token mask of ``x``'s leading shape, forwarded to the LoRA layers so
    padding is excluded from their K-FAC statistics.
    """

    features: int
    use_bias: bool = True
    lora: LoRAConfig | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    def lora_active(self) -> bool:
        """Whether this layer carries a LoRA update."""
        return self.lora is not None and lora_matches(self.lora, self.scope.path)

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None,
                 deterministic: bool = True) -> Array:
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = jnp.matmul(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        if not self.lora_active():
            return y
        cfg = self.lora
        h = nn.Dropout(rate=cfg.dropout)(x, deterministic=deterministic)
        h = KFACDense(cfg.rank, use_bias=False, dtype=dtype, param_dtype=self.param_dtype,
                      kernel_init=lora_a_init(cfg), name="lora_A")(h, mask)
        h = KFACDense(self.features, use_bias=False, dtype=dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.zeros_init(), name="lora_B")(h, mask)
        return y + (cfg.scaling * h).astype(y.dtype)
