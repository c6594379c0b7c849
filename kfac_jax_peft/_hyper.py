"""Hyperparameters of the transformations: resolving schedules, refusing nonsense.

Every transformation of the library checks its numeric settings when it is
built, so a wrong value fails at the line that wrote it, with a
``ValueError`` (or ``TypeError``) that names the argument and the allowed
range, instead of flipping a sign or disabling a safeguard silently.

What can be checked there:

* Python numbers, numpy scalars and concrete JAX scalars: type, finiteness
  and range.
* Traced values (``optax.inject_hyperparams`` passes its hyperparameters
  as arrays that are traced inside ``update``): nothing can be known at
  build time; they are checked when ``inject_hyperparams`` builds the
  transformation in ``init`` (concrete there) and are the caller's
  responsibility afterwards.
* Schedules (callables of the step count): their value at count 0 is
  checked by :func:`check_schedule_start` when the transformation's state
  is initialised; later values are the schedule's responsibility.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def resolve(value, count):
    """The value of a hyperparameter at ``count``: ``value(count)`` for a schedule."""
    return value(count) if callable(value) else value


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _as_float(name: str, value) -> float | None:
    """``float(value)`` for a concrete real scalar; None when traced."""
    if _is_traced(value):
        return None
    if isinstance(value, bool | np.bool_) or isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a real number or a schedule, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    arr = np.asarray(value) if not isinstance(value, jax.Array) else value
    if getattr(arr, "shape", None) != () or not jnp.issubdtype(arr.dtype, jnp.number) \
            or jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be a real scalar or a schedule, got {value!r}")
    return float(arr)


def check_scalar(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False,
                 schedule: bool = True) -> Any:
    """Check a real hyperparameter against ``[low, high]`` (open where asked).

    Non-finite values are always refused. Schedules (callables) pass when
    ``schedule`` is true (see :func:`check_schedule_start`). Returns
    ``value`` unchanged.
    """
    if callable(value):
        if not schedule:
            raise TypeError(f"{name} must be a number, not a schedule ({value!r})")
        return value
    v = _as_float(name, value)
    if v is None:
        return value
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be in {_interval(low, high, low_open, high_open)}, "
                         f"got {v}")
    return value


def _interval(low, high, low_open, high_open) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{left}{lo}, {hi}{right}"


def check_schedule_start(name: str, value, **bounds) -> None:
    """Check a schedule's value at count 0 against ``bounds`` (those of
    :func:`check_scalar`) when it can be computed without tracing."""
    if not callable(value):
        return
    try:
        v0 = value(jnp.zeros((), jnp.int32))
    except Exception:  # noqa: BLE001 - a schedule that needs tracing is checked by its author
        return
    check_scalar(f"{name} (its schedule's value at count 0)", v0, **bounds)


def check_positive_int(name: str, value) -> Any:
    """A positive integer (a Python or numpy integer, or an integer-valued
    concrete array); traced values pass. Returns ``value`` unchanged."""
    if _is_traced(value):
        return value
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    if not ok and isinstance(value, jax.Array | np.ndarray) and value.shape == () \
            and jnp.issubdtype(value.dtype, jnp.integer):
        ok = True
    if not ok:
        raise TypeError(f"{name} must be a positive integer, got {value!r} "
                        f"({type(value).__name__})")
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {int(value)}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")
    return value


#: Dtypes the factor decompositions (eigh, Cholesky) support on every backend.
FACTOR_DTYPES = ("float32", "float64")


def check_factor_dtype(value) -> jnp.dtype:
    """``float32`` or ``float64`` (``float64`` needs ``jax_enable_x64``)."""
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise TypeError(f"factor_dtype must be one of {FACTOR_DTYPES}, got {value!r}") from e
    if dtype.name not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype must be one of {FACTOR_DTYPES} (the eigen- and "
                         f"Cholesky decompositions need them), got {dtype.name}")
    if dtype.name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("factor_dtype='float64' needs jax_enable_x64 (jax.config.update("
                         "'jax_enable_x64', True)); without it the factors would be float32")
    return dtype
