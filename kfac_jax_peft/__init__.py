"""kfac_jax_peft: K-FAC as optax transformations for parameter-efficient fine-tuning.

The public API:

* capture: :class:`KFACDense`, :func:`dense`, :func:`capture`,
  :func:`kfac_value_and_grad`, :class:`LayerStats`; for an unmodified Linen
  model, :func:`intercept_dense` and :func:`captured_layers`; for Flax NNX,
  :func:`add_probes`, :func:`intercept_nnx` and :func:`nnx_value_and_grad`;
* transformations: :func:`kfac_precondition` (its stages in
  :mod:`kfac_jax_peft.kfac.stages`), :func:`clip_by_update_norm`,
  :func:`clip_by_fisher_norm`, and :func:`clipped`, which puts a clip
  before or after a preconditioner; :func:`adaptive_damping` and
  :func:`scale_by_quadratic_model` (Levenberg-Marquardt damping and the
  step size of the exact quadratic model, :mod:`kfac_jax_peft.adaptive`);
* EKFAC: ``kfac_precondition(damping_mode="ekfac")`` with probes from
  :func:`ekfac_probes` (:class:`EKFACProbe`);
* state readers: :func:`kfac_state`, :func:`describe` (a table of the
  registered layers and what they received), :func:`clip_stats`;
* :func:`multi_steps`: ``optax.MultiSteps`` that sums the micro-batches'
  K-FAC statistics;
* :func:`nys_newton_cg`: NysNewton-CG (Nystrom-preconditioned damped
  Newton-CG with an Armijo line search; the loss is an extra argument);
* on a device mesh: :func:`kfac_state_shardings` (factor state split over
  a mesh axis; ``kfac_precondition(distribute_inversions=True)`` spreads
  the inversions);
* the paper's optimizer: :func:`kfac`;
* :class:`KFACTrainState`: Flax's ``TrainState`` whose ``apply_gradients``
  takes ``kfac_stats``.

Subpackages: :mod:`kfac_jax_peft.fisher` (exact EF/iEF/sampled-Fisher
preconditioners, diagnostics), :mod:`kfac_jax_peft.zeroth_order` (SPSA/MeZO,
HiZOO, LoHO gradient sources), :mod:`kfac_jax_peft.models`,
:mod:`kfac_jax_peft.peft`, :mod:`kfac_jax_peft.finetune`.
"""

from kfac_jax_peft.adaptive import adaptive_damping, scale_by_quadratic_model
from kfac_jax_peft.capture import (
    EKFACProbe,
    KFACDense,
    LayerStats,
    capture,
    dense,
    kfac_value_and_grad,
    layer_stats,
    zeros_stats,
)
from kfac_jax_peft.clipping import (
    ClipState,
    clip_by_fisher_norm,
    clip_by_update_norm,
    clip_stats,
    clipped,
)
from kfac_jax_peft.kfac import (
    FactorState,
    KFACState,
    LayerState,
    describe,
    ekfac_probes,
    kfac_precondition,
    kfac_state,
    kfac_state_shardings,
    multi_steps,
)
from kfac_jax_peft.kfac.layers import captured_layers
from kfac_jax_peft.linen import intercept_dense
from kfac_jax_peft.nncg import NysNewtonCGState, nys_newton_cg
from kfac_jax_peft.nnx_capture import KFACProbe, add_probes, intercept_nnx, nnx_value_and_grad
from kfac_jax_peft.optimizers import kfac
from kfac_jax_peft.train_state import KFACTrainState

__version__ = "0.1.0"

__all__ = [
    "adaptive_damping",
    "add_probes",
    "ClipState",
    "EKFACProbe",
    "FactorState",
    "KFACDense",
    "KFACProbe",
    "KFACState",
    "KFACTrainState",
    "LayerState",
    "LayerStats",
    "capture",
    "captured_layers",
    "clip_by_fisher_norm",
    "clip_by_update_norm",
    "clip_stats",
    "clipped",
    "dense",
    "intercept_dense",
    "intercept_nnx",
    "describe",
    "ekfac_probes",
    "kfac",
    "kfac_precondition",
    "kfac_state",
    "kfac_state_shardings",
    "multi_steps",
    "nnx_value_and_grad",
    "nys_newton_cg",
    "NysNewtonCGState",
    "scale_by_quadratic_model",
    "kfac_value_and_grad",
    "layer_stats",
    "zeros_stats",
]
