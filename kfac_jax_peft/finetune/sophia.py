"""The Sophia arm of the pipeline: ``optax.contrib.scale_by_sophia`` with the
run's settings, and the fraction of coordinates its clip cut.

Sophia (Liu et al. 2023, Algorithm 3) keeps a momentum ``m_t`` of the
gradients and, every ``k`` steps, a moving average ``h_t`` of a stochastic
estimate of the Hessian diagonal, and steps by::

    theta <- theta - eta_t * clip(m_hat_t / max(gamma * h_t, eps), 1)

with ``m_hat_t = m_t / (1 - b1^t)`` and ``clip(x, 1) = max(-1, min(1, x))``
per coordinate: a diagonal Newton step where the curvature is positive and
large enough, a sign (signSGD) step of size ``eta_t`` elsewhere, so that
negative or tiny curvature can never blow a coordinate up. The learning rate
is therefore the largest step any coordinate takes. The Hessian-diagonal
estimate is one of the paper's two (``sophia_estimator``):

* ``"hutchinson"`` (Algorithm 1): ``u * (H u)`` with ``u`` a Rademacher
  vector and ``H u`` one Hessian-vector product (``jax.jvp`` of
  ``jax.grad`` of the step's loss), unbiased for ``diag(H)``;
* ``"gnb"``, Gauss-Newton-Bartlett (Algorithm 2,
  :func:`gnb_estimator_diag_hessian`): labels ``y_hat_b`` drawn from the
  model's predictive distribution on the batch, ``g_hat`` the gradient of
  the mean loss on them, and ``B * g_hat * g_hat``; by Bartlett's second
  identity its expectation is the diagonal of the Gauss-Newton matrix
  ``(1/B) sum_b J_b^T H_l J_b`` (``H_l`` the loss's Hessian in the logits),
  which is positive semi-definite, unlike ``diag(H)``.

Nothing here re-implements Sophia: the arm is ``optax.contrib.sophia``
(Sophia, decoupled weight decay, the learning rate) with optax's
``hutchinson_estimator_diag_hessian`` or :func:`gnb_estimator_diag_hessian`,
fed with the extra arguments of :func:`kfac_jax_peft.finetune.steps`'s
``_objective``: ``obj_fn``, the step's loss as a function of the trainable
parameters (the same batch and dropout key as the gradient), and for GNB
``logits_fn``, ``gnb_loss_fn`` and ``gnb_batch_size``. What is added:

* :func:`sophia_arm`: the configured transformation; on several devices
  (``axis_name``) the Hessian-diagonal estimate is averaged over the
  devices (every device draws the same ``u``: the estimator's key is
  replicated state), so the update equals the one-device update on the
  global batch;
* :func:`gnb_estimator_diag_hessian`: the GNB estimator, with the contract
  of optax's Hutchinson estimator (a ``GradientTransformationExtraArgs``
  keeping its key in its state, usable as ``hessian_diagonal_fn`` of
  ``optax.contrib.sophia``);
* :func:`with_clip_fraction` / :func:`clip_fraction`: the fraction of
  coordinates whose step Sophia clipped at the last call (optax computes
  it only to print it), read from Sophia's state. The paper's "win rate"
  is one minus it; its authors keep it between 0.1 and 0.5 by tuning
  ``gamma`` (larger ``gamma``: more clipping).

Sophia clips each coordinate itself, so the Newton-step clip of K-FAC
(``clip="post"``, a clip of the preconditioned update's norm) has no place
after it: the pipeline refuses it. ``clip="pre"`` clips the gradient's norm
before it enters Sophia's momentum (the Sophia paper trains GPT-2 with it);
``clip="none"`` leaves Sophia's own clip alone (the ``sophia`` arm).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from kfac_jax_peft.finetune.config import SOPHIA_ESTIMATORS
from kfac_jax_peft.likelihoods import check_likelihood, sample_labels

#: Sophia's per-coordinate clip. With the paper's ``clip(m / max(gamma h, eps), 1)``
#: the threshold is 1 and the learning rate sets the largest step.
CLIP_THRESHOLD = 1.0

#: Folded into ``PRNGKey(seed)`` for the Hutchinson vectors (or GNB's sampled
#: labels), so that they are not the dropout keys (which fold in the step number).
_HUTCHINSON_STREAM = 0x50F1A


class GNBState(NamedTuple):
    """State of :func:`gnb_estimator_diag_hessian`: the key of the next draw
    (split at every call, like optax's ``HutchinsonState``)."""

    key: jax.Array


def gnb_estimator_diag_hessian(random_seed: jax.Array | None = None, *,
                               likelihood: str = "categorical", variance: float = 1.0
                               ) -> optax.GradientTransformationExtraArgs:
    """Sophia's Gauss-Newton-Bartlett estimate of the Hessian diagonal
    (Liu et al. 2023, Algorithm 2), as a ``hessian_diagonal_fn`` of
    ``optax.contrib.sophia``.

    ``update(updates, state, params, *, logits_fn, gnb_loss_fn,
    gnb_batch_size=None)`` (``updates`` is ignored):

    * ``logits_fn(params) -> z``: the model's outputs on the batch, ``[B, C]``
      logits (``"categorical"``) or ``[B, ...]`` means (``"gaussian"``);
    * ``gnb_loss_fn(z, labels) -> scalar``: the loss on the batch as a
      function of the outputs and the labels, the mean over the ``B``
      examples of per-example losses ``l(z_b, y_b)`` (masked rows
      contributing nothing), where ``l(z, y) = -log p(y | z) + const``;
    * ``gnb_batch_size``: ``B``, the number of examples the loss averages
      (e.g. the count of unpadded rows); default ``z.shape[0]``.

    It draws ``y_hat_b ~ p(. | z_b)`` (:func:`~kfac_jax_peft.likelihoods.sample_labels`:
    ``softmax(z_b)``, or ``N(z_b, variance)``), takes
    ``g_hat = grad_params gnb_loss_fn(logits_fn(params), y_hat)`` (one
    forward and one backward pass: ``jax.vjp`` of ``logits_fn``) and returns
    ``B * g_hat * g_hat``. With ``r_b = grad_z l(z_b, y_hat_b)`` independent
    with ``E[r_b] = 0`` and ``E[r_b r_b^T] = H_l(z_b)`` (Bartlett's
    identities, which need ``l`` to be the negative log-likelihood of the
    sampling distribution: ``variance`` must match the loss, e.g. 1/2 for
    the squared error ``(z - y)^2``),
    ``E[B g_hat g_hat^T] = (1/B) sum_b J_b^T H_l(z_b) J_b``, the
    Gauss-Newton matrix of the mean loss; the estimate is its diagonal's
    unbiased, non-negative estimate.

    The key (``random_seed``, default ``PRNGKey(0)``) lives in the
    :class:`GNBState` and is split at every call.
    """
    check_likelihood(likelihood)
    if not variance > 0:
        raise ValueError(f"gnb_estimator_diag_hessian: variance must be > 0, got {variance!r}")

    def init_fn(params):
        del params
        return GNBState(random_seed if random_seed is not None else jax.random.PRNGKey(0))

    def update_fn(updates, state, params=None, logits_fn=None, gnb_loss_fn=None,
                  gnb_batch_size=None, **extra_args):
        del updates, extra_args
        if params is None:
            raise ValueError("params must be provided to the GNB estimator's update")
        if logits_fn is None or gnb_loss_fn is None:
            raise ValueError("the GNB estimator's update needs the extra arguments "
                             "logits_fn(params) -> logits and gnb_loss_fn(logits, labels) "
                             "-> loss")
        key, subkey = jax.random.split(state.key)
        logits, pullback = jax.vjp(logits_fn, params)
        labels = sample_labels(logits, subkey, likelihood, variance)
        (g_hat,) = pullback(jax.grad(gnb_loss_fn)(logits, labels))
        b = logits.shape[0] if gnb_batch_size is None else gnb_batch_size
        diag = jax.tree.map(lambda g: (b * jnp.square(g)).astype(g.dtype), g_hat)
        return diag, GNBState(key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ClipFractionState(NamedTuple):
    """State of :func:`with_clip_fraction`.

    Attributes:
      count: number of ``update`` calls.
      fraction: float32, the fraction of coordinates whose Sophia step was
        clipped at the last call.
      inner: the wrapped ``optax.contrib.sophia`` state.
    """

    count: jax.Array
    fraction: jax.Array
    inner: Any


def _sophia_state(state) -> contrib.SophiaState:
    is_state = lambda x: isinstance(x, contrib.SophiaState)  # noqa: E731
    found = [s for s in jax.tree_util.tree_leaves(state, is_leaf=is_state) if is_state(s)]
    if len(found) != 1:
        raise ValueError(f"with_clip_fraction wraps a chain holding one Sophia state, found "
                         f"{len(found)}")
    return found[0]


def clipped_fraction(before: contrib.SophiaState, after: contrib.SophiaState, *,
                     b1, gamma, eps, threshold) -> jax.Array:
    """The fraction of coordinates Sophia clipped in the step from state
    ``before`` to state ``after``: the step was ``clip(r, threshold)`` with
    ``r = (m_t / (1 - b1^t)) / max(gamma h, eps)``, ``m_t``, ``t`` of
    ``after`` and ``h`` of ``before`` (the Hessian diagonal is refreshed
    after the step), and a coordinate is clipped where ``|r| >= threshold``
    (optax's win rate counts ``|r| < threshold``). Computed with optax's
    own operations, so it agrees with the step coordinate for coordinate.
    """
    mu_hat = optax.tree.bias_correction(after.mu, b1, after.count)
    ratio = jax.tree.map(lambda m, h: m / jnp.maximum(gamma * h, eps), mu_hat, before.nu)
    leaves = jax.tree_util.tree_leaves(ratio)
    at = sum(jnp.sum(jnp.abs(r) >= threshold, dtype=jnp.int32) for r in leaves)
    return (at / max(sum(r.size for r in leaves), 1)).astype(jnp.float32)


def with_clip_fraction(sophia: optax.GradientTransformation, *, b1, gamma, eps,
                       threshold) -> optax.GradientTransformationExtraArgs:
    """``sophia`` (an ``optax.contrib.sophia`` made with ``b1``, ``gamma``,
    ``eps``, ``clip_threshold=threshold``) recording, in a
    :class:`ClipFractionState`, the fraction of coordinates it clipped at the
    last call (:func:`clipped_fraction`). The updates pass through
    unchanged."""
    sophia = optax.with_extra_args_support(sophia)

    def init_fn(params):
        return ClipFractionState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
                                 sophia.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        updates, inner = sophia.update(updates, state.inner, params, **extra_args)
        fraction = clipped_fraction(_sophia_state(state.inner), _sophia_state(inner), b1=b1,
                                    gamma=gamma, eps=eps, threshold=threshold)
        return updates, ClipFractionState(optax.safe_increment(state.count), fraction, inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_fraction(opt_state) -> jax.Array | None:
    """The ``fraction`` of the first :class:`ClipFractionState` in an optimizer
    state, or None (a chain without Sophia)."""
    is_state = lambda x: isinstance(x, ClipFractionState)  # noqa: E731
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state):
        if is_state(s):
            return s.fraction
    return None


def _pmean_estimate(estimator: optax.GradientTransformation, axis_name: str
                    ) -> optax.GradientTransformationExtraArgs:
    """``estimator`` whose output (a Hessian-diagonal estimate) is averaged
    over ``axis_name``: the Hessian of the global mean loss is the mean of
    the devices' Hessians (equal shards), and ``u`` is the same on every
    device, so ``mean_d u * (H_d u) = u * (H u)``."""
    estimator = optax.with_extra_args_support(estimator)

    def update_fn(updates, state, params=None, **extra_args):
        diag, state = estimator.update(updates, state, params, **extra_args)
        return jax.lax.pmean(diag, axis_name), state

    return optax.GradientTransformationExtraArgs(estimator.init, update_fn)


def hutchinson_key(seed: int) -> jax.Array:
    """The key of the Hutchinson vectors of a run of seed ``seed``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), _HUTCHINSON_STREAM)


def gnb_likelihood(task) -> tuple[str, float]:
    """``(likelihood, variance)`` of GNB's sampled labels for a task (a name
    or a :class:`~kfac_jax_peft.data.tasks.TaskSpec`): categorical for
    classification and multiple choice; for regression, whose training loss
    is the squared error ``(z - y)^2`` (:class:`~kfac_jax_peft.finetune.model.TaskModel`),
    the Gaussian of which it is the negative log-likelihood, ``N(z, 1/2)``,
    so that the estimate's expectation is that loss's Gauss-Newton diagonal
    (a unit variance would double it)."""
    from kfac_jax_peft.data.tasks import get_task

    if get_task(task).kind == "regression":
        return "gaussian", 0.5
    return "categorical", 1.0


def sophia_estimator(cfg, axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
    """The Hessian-diagonal estimator ``cfg.sophia_estimator`` names, keyed by
    :func:`hutchinson_key`: optax's Hutchinson estimator (extra argument
    ``obj_fn``) or :func:`gnb_estimator_diag_hessian` with the task's
    :func:`gnb_likelihood` (extra arguments ``logits_fn``, ``gnb_loss_fn``,
    ``gnb_batch_size``); averaged over ``axis_name``. For GNB the average of
    the devices' estimates is unbiased for the global batch's Gauss-Newton
    diagonal but is not the one-device estimate (a mean of squares)."""
    key = hutchinson_key(cfg.seed)
    if cfg.sophia_estimator == "hutchinson":
        estimator = contrib.hutchinson_estimator_diag_hessian(key)
    elif cfg.sophia_estimator == "gnb":
        likelihood, variance = gnb_likelihood(cfg.task)
        estimator = gnb_estimator_diag_hessian(key, likelihood=likelihood, variance=variance)
    else:
        raise ValueError(f"sophia_estimator must be one of {', '.join(SOPHIA_ESTIMATORS)}, got "
                         f"{cfg.sophia_estimator!r}")
    return estimator if axis_name is None else _pmean_estimate(estimator, axis_name)


def sophia_arm(cfg, learning_rate: optax.ScalarOrSchedule, weight_decay_mask=None,
               axis_name: str | None = None, *, weight_decay=None
               ) -> optax.GradientTransformationExtraArgs:
    """``optax.contrib.sophia`` with ``cfg``'s ``sophia_b1``, ``sophia_b2``,
    ``sophia_gamma``, ``sophia_eps``, ``sophia_hessian_every`` and
    ``weight_decay`` (on ``weight_decay_mask``; ``weight_decay`` given:
    that value instead, e.g. a traced one), the clip at
    :data:`CLIP_THRESHOLD`, the estimator of :func:`sophia_estimator`
    (``cfg.sophia_estimator``, averaged over ``axis_name``), wrapped by
    :func:`with_clip_fraction`. Its ``update`` needs ``params`` and the
    extra argument ``obj_fn`` (Hutchinson) or ``logits_fn``,
    ``gnb_loss_fn``, ``gnb_batch_size`` (GNB).
    """
    estimator = sophia_estimator(cfg, axis_name)
    tx = contrib.sophia(
        learning_rate, b1=cfg.sophia_b1, b2=cfg.sophia_b2, eps=cfg.sophia_eps,
        weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
        weight_decay_mask=weight_decay_mask,
        gamma=cfg.sophia_gamma, clip_threshold=CLIP_THRESHOLD,
        update_interval=cfg.sophia_hessian_every, hessian_diagonal_fn=estimator)
    return with_clip_fraction(tx, b1=cfg.sophia_b1, gamma=cfg.sophia_gamma, eps=cfg.sophia_eps,
                              threshold=CLIP_THRESHOLD)
