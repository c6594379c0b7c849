"""The K-FAC stages on their own, against dense algebra; NaN kept out of the state."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_transform import _problem

import kfac_jax_peft as kp
from kfac_jax_peft.kfac import stages as S
from kfac_jax_peft.kfac.layers import LayerSpec, default_layer_filter, register


@pytest.fixture(autouse=True)
def x64(request):
    """The dense comparisons run in float64; tests on the float32 toy problem opt out."""
    on = "float32" not in request.keywords
    jax.config.update("jax_enable_x64", on)
    yield
    jax.config.update("jax_enable_x64", False)


def _spd(rng, d, scale=1.0):
    m = rng.normal(size=(d, d))
    return scale * (m @ m.T / d + 0.1 * np.eye(d))


def _stats(rng, d_a, d_g, tokens=7.0, examples=3.0):
    return kp.LayerStats(jnp.asarray(_spd(rng, d_a) * tokens),
                         jnp.asarray(_spd(rng, d_g) * examples),
                         jnp.asarray(tokens), jnp.asarray(examples))


SPECS = {"x/kernel": LayerSpec("x/kernel", None, "x/kernel/A", "x/kernel/G", 4, 3),
         "y/kernel": LayerSpec("y/kernel", "y/bias", "grp", "y/kernel/G", 4, 2),
         "z/kernel": LayerSpec("z/kernel", None, "grp", "z/kernel/G", 4, 5)}


def _factors(exact=True, store=True, dtype=jnp.float64):
    keys = {"x/kernel/A": 4, "x/kernel/G": 3, "grp": 4, "y/kernel/G": 2, "z/kernel/G": 5}
    return {k: S.init_factor(d, dtype, store=store, exact=exact) for k, d in keys.items()}


def test_factor_statistics_normalise_share_and_couple():
    rng = np.random.default_rng(0)
    st = {p: _stats(rng, s.d_a, s.d_g) for p, s in SPECS.items()}
    out = S.factor_statistics(SPECS, st, jnp.float64)
    np.testing.assert_allclose(out["x/kernel/A"][0], st["x/kernel"].A / 7.0, rtol=1e-15)
    np.testing.assert_allclose(out["z/kernel/G"][0], st["z/kernel"].G / 3.0, rtol=1e-15)
    # the group's A comes from its first member in path order (y), z's is not read
    np.testing.assert_allclose(out["grp"][0], st["y/kernel"].A / 7.0, rtol=1e-15)
    assert all(bool(ok) for _, ok in out.values())
    # a NaN in the group's source rejects the group and every member's G,
    # a NaN in a layer's own G rejects its own A with it
    bad = dict(st, y=None)
    bad.pop("y")
    bad["y/kernel"] = st["y/kernel"]._replace(A=st["y/kernel"].A.at[0, 0].set(jnp.nan))
    bad["x/kernel"] = st["x/kernel"]._replace(G=st["x/kernel"].G.at[1, 1].set(jnp.inf))
    ok = {k: bool(v[1]) for k, v in S.factor_statistics(SPECS, bad, jnp.float64).items()}
    assert ok == {"x/kernel/A": False, "x/kernel/G": False, "grp": False,
                  "y/kernel/G": False, "z/kernel/G": False}
    # a batch without a real token, or a non-finite gradient on the step
    empty = dict(st, **{"x/kernel": st["x/kernel"]._replace(num_tokens=jnp.asarray(0.0))})
    ok = {k: bool(v[1]) for k, v in S.factor_statistics(SPECS, empty, jnp.float64).items()}
    assert not ok["x/kernel/A"] and not ok["x/kernel/G"] and ok["grp"] and ok["y/kernel/G"]
    # a layer whose gradient is not finite: its own factors are rejected; a
    # shared input factor is judged by its statistics only (documented)
    grad_ok = {"x/kernel": jnp.asarray(True), "y/kernel": jnp.asarray(False),
               "z/kernel": jnp.asarray(True)}
    ok = {k: bool(v[1]) for k, v in S.factor_statistics(SPECS, st, jnp.float64, grad_ok).items()}
    assert ok == {"x/kernel/A": True, "x/kernel/G": True, "grp": True, "y/kernel/G": False,
                  "z/kernel/G": True}


def test_accumulate_is_the_bias_corrected_moving_average():
    rng = np.random.default_rng(1)
    xs = [_spd(rng, 3) for _ in range(4)]
    for decay in (0.0, 0.5, 0.9):
        f = {"k": S.init_factor(3, jnp.float64, store=True, exact=True)}
        for x in xs:
            f, acc = S.accumulate(f, {"k": (jnp.asarray(x), jnp.asarray(True))}, decay)
            assert bool(acc["k"])
        w = np.array([(1 - decay) * decay ** (len(xs) - 1 - i) for i in range(len(xs))])
        want = sum(wi * x for wi, x in zip(w, xs)) / w.sum()
        np.testing.assert_allclose(f["k"].average / f["k"].weight, want, rtol=1e-13)
        assert int(f["k"].num_stats) == 4 and int(f["k"].num_rejected) == 0


@pytest.mark.float32
def test_accumulate_cannot_overflow():
    """Finite statistics near the float32 maximum: the average is a convex
    combination, so it stays finite; a decay outside [0, 1) (only a traced
    hyperparameter can get past the construction-time check) would make it
    overflow, and is rejected."""
    big = jnp.full((2, 2), 3e38, jnp.float32)
    f = {"k": S.init_factor(2, jnp.float32, store=True, exact=True)}
    for _ in range(3):
        f, acc = S.accumulate(f, {"k": (big, jnp.asarray(True))}, 0.5)
        assert bool(acc["k"]) and bool(jnp.all(jnp.isfinite(f["k"].average)))
    for decay in (-1.0, 1.5, jnp.nan):
        f2, acc = S.accumulate(f, {"k": (big, jnp.asarray(True))}, decay)
        assert not bool(acc["k"]) and int(f2["k"].num_rejected) == 1
        np.testing.assert_array_equal(f2["k"].average, f["k"].average)


@pytest.mark.parametrize("damping", [1e-6, 1e-3, 1.0])
def test_exact_precondition_equals_the_dense_kronecker_solve(damping):
    rng = np.random.default_rng(2)
    factors = _factors()
    est = {k: _spd(rng, f.average.shape[0]) for k, f in factors.items()}
    stats = {k: (jnp.asarray(v), jnp.asarray(True)) for k, v in est.items()}
    factors, _ = S.accumulate(factors, stats, 0.0)
    factors = S.commit_eigen(factors, *S.decompose(factors, factors))
    layers = S.exact_flags(SPECS, factors, {p: S.init_layer(s, jnp.float64, exact=True,
                                                            method="eigh")
                                            for p, s in SPECS.items()})
    grads = {"x": {"kernel": rng.normal(size=(4, 3))},
             "y": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2)},
             "z": {"kernel": rng.normal(size=(4, 5))}, "other": rng.normal(size=3)}
    grads = jax.tree_util.tree_map(jnp.asarray, grads)
    out = S.precondition(grads, SPECS, factors, layers, damping, exact=True)
    for path, spec in SPECS.items():
        name = path.split("/")[0]
        v = np.asarray(grads[name]["kernel"])
        if spec.bias is not None:
            v = np.concatenate([v, np.asarray(grads[name]["bias"])[None]], 0)
        A, G = est[spec.a_key], est[spec.g_key]
        u = np.linalg.solve(np.kron(A, G) + damping * np.eye(v.size), v.ravel()).reshape(v.shape)
        got = np.asarray(out[name]["kernel"])
        if spec.bias is not None:
            got = np.concatenate([got, np.asarray(out[name]["bias"])[None]], 0)
        np.testing.assert_allclose(got, u, rtol=1e-9, atol=1e-12 * np.abs(u).max())
    np.testing.assert_array_equal(out["other"], grads["other"])


def test_factored_inverses_equal_the_dense_pi_damped_ones():
    rng = np.random.default_rng(3)
    specs = {"x/kernel": SPECS["x/kernel"]}
    factors = {k: S.init_factor(d, jnp.float64, store=True, exact=False)
               for k, d in (("x/kernel/A", 4), ("x/kernel/G", 3))}
    A, G = _spd(rng, 4, 10.0), _spd(rng, 3, 0.1)
    factors, _ = S.accumulate(factors, {"x/kernel/A": (jnp.asarray(A), jnp.asarray(True)),
                                        "x/kernel/G": (jnp.asarray(G), jnp.asarray(True))}, 0.0)
    lam = 1e-2
    for method in ("cholesky", "cholesky_solve", "eigh"):
        layers = {"x/kernel": S.init_layer(specs["x/kernel"], jnp.float64, exact=False,
                                           method=method)}
        layers = S.invert_layers(specs, factors, layers, lam, method, 1, 1e-3)
        assert bool(layers["x/kernel"].has_curvature)
        v = rng.normal(size=(4, 3))
        got = S.precondition({"x": {"kernel": jnp.asarray(v)}}, specs, factors, layers, lam,
                             exact=False)["x"]["kernel"]
        pi = np.sqrt((np.trace(A) / 4) / (np.trace(G) / 3))
        want = (np.linalg.inv(A + pi * np.sqrt(lam) * np.eye(4)) @ v
                @ np.linalg.inv(G + np.sqrt(lam) / pi * np.eye(3)))
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_a_failed_inversion_keeps_the_previous_curvature():
    factors = {"k": S.init_factor(2, jnp.float64, store=True, exact=True)}
    factors, _ = S.accumulate(factors, {"k": (jnp.eye(2) * 2.0, jnp.asarray(True))}, 0.0)
    factors = S.commit_eigen(factors, *S.decompose(factors, factors))
    before = factors["k"].eigen
    broken = {"k": factors["k"]._replace(average=jnp.full((2, 2), jnp.nan))}
    dec, good = S.decompose(broken, broken)
    assert not bool(good["k"])
    after = S.commit_eigen(broken, dec, good)["k"]
    for a, b in zip(before, after.eigen):
        np.testing.assert_array_equal(a, b)
    assert bool(after.decomposed)


@pytest.mark.float32
def test_stages_compose_into_a_custom_schedule():
    """A variant built from the stages (accumulate every call, decompose every
    other call) gives the same direction as kfac_precondition(invert_every=2)."""
    params, probes, loss, X, Y = _problem()
    specs = register(params, default_layer_filter, lambda p: None)
    tx = kp.kfac_precondition(1e-2, decay=0.5, invert_every=2)
    state = tx.init(params)
    factors = {k: S.init_factor(d, jnp.float32, store=True, exact=True)
               for k, d in (("dense/kernel/A", 6), ("dense/kernel/G", 3))}
    layers = {p: S.init_layer(s, jnp.float32, exact=True, method="eigh") for p, s in specs.items()}
    for i in range(4):
        _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X * (1 + i), Y)
        u_ref, state = tx.update(grads, state, params, kfac_stats=stats)
        matched = S.match_statistics(grads, specs, stats)
        factors, _ = S.accumulate(factors, S.factor_statistics(specs, matched, jnp.float32), 0.5)
        if i % 2 == 0:
            factors = S.commit_eigen(factors, *S.decompose(factors, factors))
            layers = S.exact_flags(specs, factors, layers)
        u = S.precondition(grads, specs, factors, layers, 1e-2, exact=True)
        np.testing.assert_allclose(u["dense"]["kernel"], u_ref["dense"]["kernel"], rtol=1e-6)


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.float32
def test_huge_activations_and_nan_gradients_never_enter_the_chain_state():
    """Activations of 1e18 give finite statistics whose update's norm overflows
    float32; NaN gradients on a statistics step. Either way every leaf of the
    whole chain's state stays finite, and the K-FAC factors are untouched by
    the NaN step."""
    params, probes, loss, X, Y = _problem()
    tx = kp.kfac(0.1, damping=1e-3, weight_decay=0.0)
    state = tx.init(params)
    _, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X * 1e18, Y)
    u, state1 = tx.update(grads, state, params, kfac_stats=stats)
    assert _finite(state1) and _finite(u)
    assert float(optax.tree.norm(u)) <= 0.1 * (1 + 1e-5)  # the Newton-step clip held
    assert bool(kp.clip_stats(state1).clipped)
    nan_grads = jax.tree_util.tree_map(lambda g: g * jnp.nan, grads)
    _, good = kp.kfac_value_and_grad(loss)(params, probes, X, Y)[1:]
    u2, state2 = tx.update(nan_grads, state1, params, kfac_stats=good)
    assert _finite(state2)
    np.testing.assert_array_equal(u2["dense"]["kernel"], 0.0)  # the skipped step
    k1, k2 = kp.kfac_state(state1), kp.kfac_state(state2)
    for key in k1.factors:
        for a, b in zip(jax.tree_util.tree_leaves(k1.factors[key][:4]),
                        jax.tree_util.tree_leaves(k2.factors[key][:4])):
            np.testing.assert_array_equal(a, b)
        assert int(k2.factors[key].num_rejected) == int(k1.factors[key].num_rejected) + 1


PMAP_NAN = """
import jax, jax.numpy as jnp, numpy as np
import kfac_jax_peft as kp
from test_transform import _problem
params, probes, loss, X, Y = _problem()
tx = kp.kfac_precondition(1e-2, axis_name="d")
_, grads, stats = kp.kfac_value_and_grad(loss)(params, probes, X, Y)
g, st, state = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), (grads, stats, tx.init(params)))
g["dense"]["kernel"] = g["dense"]["kernel"].at[0].set(jnp.nan)
step = jax.pmap(lambda g, s, st: tx.update(g, s, None, kfac_stats=st), axis_name="d")
_, new = step(g, state, st)
print("REJECTED", np.asarray(new.factors["dense/kernel/G"].num_rejected).tolist())
"""


@pytest.mark.float32
def test_nonfinite_gradient_rejected_on_every_device_alike():
    """Under pmap a NaN gradient on one device rejects the statistics on all of
    them (the count of bad devices is summed with the statistics), so the
    replicas of the state never diverge."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(pathlib.Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", PMAP_NAN], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REJECTED [1, 1]" in out.stdout, out.stdout


@pytest.mark.float32
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_low_precision_parameters_keep_the_chain_state_finite(dtype):
    """Parameters and gradients in float16/bfloat16/float32 whose squares
    overflow the dtype (float16 above 256, as a sum): factors stay float32,
    the state finite, the Newton-step clip bounds the step."""
    params, probes, loss, X, Y = _problem()
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    _, grads, stats = kp.kfac_value_and_grad(loss)(
        jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params), probes, X * 300, Y)
    big = {"float16": 6e4, "bfloat16": 1e30, "float32": 1e30}[dtype]
    grads = jax.tree_util.tree_map(lambda g: (g / jnp.max(jnp.abs(g)) * big).astype(dtype), grads)
    tx = kp.kfac(0.1, damping=1e-3, weight_decay=0.0)
    u, state = tx.update(grads, tx.init(params), params, kfac_stats=stats)
    assert _finite(state) and _finite(u)
    k = kp.kfac_state(state)
    assert all(f.weight.dtype == jnp.float32 for f in k.factors.values())
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree_util.tree_leaves(u))
    norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                              for x in jax.tree_util.tree_leaves(u))))
    assert norm <= 0.1 * (1 + 4 * float(jnp.finfo(dtype).eps))
