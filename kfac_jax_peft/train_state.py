"""A Flax ``TrainState`` whose ``apply_gradients`` hands K-FAC its statistics.

``flax.training.train_state.TrainState.apply_gradients(grads=...)`` calls
``tx.update(grads, opt_state, params)`` with no way to pass the extra
argument ``kfac_stats``: K-FAC would never see a statistic and would
precondition nothing (``kfac_precondition`` warns when that happens).
:class:`KFACTrainState` is the same dataclass with one more keyword::

    state = KFACTrainState.create(apply_fn=model.apply, params=trainable, tx=tx)
    loss, grads, stats = kfac_value_and_grad(loss_fn)(state.params, probes, batch)
    state = state.apply_gradients(grads=grads, kfac_stats=stats)

Any other optax extra argument is passed the same way, through
``extra_args`` (a dict), since keyword arguments of ``apply_gradients``
replace dataclass fields, as in Flax.
"""

from __future__ import annotations

import optax
from flax.training import train_state


class KFACTrainState(train_state.TrainState):
    """``TrainState`` whose ``apply_gradients`` takes ``kfac_stats`` (and other
    optax extra arguments in ``extra_args``)."""

    def apply_gradients(self, *, grads, kfac_stats=None, extra_args=None, **kwargs):
        """One optimizer step: ``tx.update(grads, opt_state, params,
        kfac_stats=kfac_stats, **extra_args)``, then ``optax.apply_updates``;
        ``step`` grows by one and ``kwargs`` replace fields, as in Flax."""
        extra = dict(extra_args or {})
        if kfac_stats is not None:
            extra["kfac_stats"] = kfac_stats
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state, **kwargs)
