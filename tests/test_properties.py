"""Property tests: the C kernel equals the pure-torch reference bit for bit over random shapes,
strides, dtypes, values (ties at λ, NaN, ±inf), repeated indices, masks, states and
hyper-parameters; and the NumPy-level API fed random garbage raises only documented errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import glofnd
from glofnd import _checks, _ops, numpy_api, reference

C = _ops._C
needs_c = pytest.mark.skipif(C is None, reason="C extension not built")
FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPECIAL = (math.nan, math.inf, -math.inf, 0.0, 1.0, -1.0, 0.5, -0.0)


# ---------------------------------------------------------------------------------------------
# C kernel == reference


@st.composite
def layouts(draw, shape, dtype, elements):
    """An array of `shape` drawn as C-order, transposed, sliced with steps, or flipped."""
    r, m = shape
    kind = draw(st.sampled_from(["c", "t", "step", "flip0", "flip1", "flip01"]))
    if kind == "t":
        return draw(hnp.arrays(dtype, (m, r), elements=elements)).T
    if kind == "step":
        big = draw(hnp.arrays(dtype, (2 * r, 3 * m), elements=elements))
        return big[::2, ::3]
    a = draw(hnp.arrays(dtype, shape, elements=elements))
    axis = {"c": None, "flip0": 0, "flip1": 1, "flip01": (0, 1)}[kind]
    return a if axis is None else np.flip(a, axis)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    r, m, n = draw(st.integers(1, 7)), draw(st.integers(1, 9)), draw(st.integers(1, 6))
    f32 = dict(width=32, allow_nan=False, allow_infinity=False)
    lambdas = draw(hnp.arrays(np.float32, n, elements=st.one_of(
        st.floats(-1, 1, **f32), st.sampled_from([1.0, -1.0, 0.0]))))
    state = {
        "lambdas": lambdas,
        "exp_avg": draw(hnp.arrays(np.float32, n, elements=st.floats(-1, 1, **f32))),
        "exp_avg_sq": draw(hnp.arrays(np.float32, n, elements=st.floats(0, 1, **f32))),
        "steps": draw(hnp.arrays(np.int32, n, elements=st.one_of(
            st.integers(0, 60), st.sampled_from([2**31 - 2, 2**31 - 1])))),
    }
    index = draw(hnp.arrays(np.int64, r, elements=st.integers(0, n - 1)))
    # entries: random, special values, and exact ties with the thresholds in the state
    ties = [float(x) for x in lambdas]
    width = 32 if dtype == np.float32 else 64
    elements = st.one_of(st.floats(-1, 1, width=width), st.sampled_from(SPECIAL + tuple(ties)))
    sim = draw(layouts((r, m), dtype, elements))
    valid = draw(st.one_of(st.none(), layouts((r, m), np.bool_, st.booleans())))
    lo = draw(st.sampled_from([-1.0, -0.3]))
    params = dict(
        alpha=draw(st.floats(1e-4, 0.9999)),
        lr=draw(st.one_of(st.floats(0, 2), st.just(0.05))),
        beta1=draw(st.sampled_from([0.9, 0.0, 0.5])),
        beta2=draw(st.sampled_from([0.98, 0.999, 0.0])),
        eps=draw(st.sampled_from([1e-8, 1e-3])),
        lo=lo, hi=draw(st.sampled_from([1.0, lo, 0.7])),
        optimizer=draw(st.sampled_from([reference.ADAM, reference.SGD])),
        step=draw(st.one_of(st.just(0), st.integers(1, 200))),
        update=draw(st.booleans()),
    )
    threads = draw(st.integers(1, 3))
    return sim, index, valid, state, params, threads


def _bytes(mask, kept, state):
    return (mask.dtype.str, mask.shape, mask.tobytes(), kept.dtype.str, kept.tobytes(),
            *(state[k].tobytes() for k in ("lambdas", "exp_avg", "exp_avg_sq", "steps")))


@needs_c
@FAST
@given(problems())
def test_c_kernel_equals_reference(problem):
    sim, index, valid, state, params, threads = problem
    st_c = {k: v.copy() for k, v in state.items()}
    st_r = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    sim_before = sim.tobytes()

    mask_c, kept_c = C.step(sim, index, valid, st_c["lambdas"], st_c["exp_avg"],
                            st_c["exp_avg_sq"], st_c["steps"], num_threads=threads, **params)
    mask_r, kept_r = reference.threshold_step(
        torch.from_numpy(sim.copy()), torch.from_numpy(index),
        None if valid is None else torch.from_numpy(valid.copy()),
        st_r["lambdas"], st_r["exp_avg"], st_r["exp_avg_sq"], st_r["steps"], **params)

    ref = _bytes(mask_r.numpy(), kept_r.numpy(), {k: v.numpy() for k, v in st_r.items()})
    assert _bytes(mask_c, kept_c, st_c) == ref
    assert sim.tobytes() == sim_before  # the input is not written
    assert np.isfinite(st_c["lambdas"]).all()
    if not params["update"]:
        assert _bytes(mask_c, kept_c, st_c)[5:] == _bytes(mask_c, kept_c, state)[5:]


@needs_c
@FAST
@given(problems(), st.integers(2, 4))
def test_c_kernel_independent_of_thread_count(problem, threads):
    sim, index, valid, state, params, _ = problem
    outs = []
    for nt in (1, threads):
        s = {k: v.copy() for k, v in state.items()}
        mask, kept = C.step(sim, index, valid, s["lambdas"], s["exp_avg"], s["exp_avg_sq"],
                            s["steps"], num_threads=nt, **params)
        outs.append(_bytes(mask, kept, s))
    assert outs[0] == outs[1]


# ---------------------------------------------------------------------------------------------
# Fuzz: random garbage into the NumPy-level API raises only TypeError/ValueError/IndexError/
# OverflowError, never crashes, and a failed call leaves the state as it was.

ALLOWED = (TypeError, ValueError, IndexError, OverflowError)
DTYPES = [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.uint64, np.float16, np.float32,
          np.float64, np.complex64, np.dtype("U2"), np.dtype("datetime64[s]"), np.dtype(object)]


def _any_array():
    return hnp.arrays(st.sampled_from(DTYPES),
                      hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))


def _garbage():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.integers(-3, 3000),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                        st.complex_numbers(max_magnitude=10))
    return st.one_of(scalars, _any_array(), st.lists(scalars, max_size=3),
                     st.tuples(scalars, scalars), st.dictionaries(st.text(max_size=2), scalars,
                                                                  max_size=2))


def _good(n):
    rng = np.random.default_rng(0)
    return {"sim": rng.uniform(-1, 1, (4, 5)).astype(np.float32),
            "index": np.array([0, 1, 2, 0]) % n, "valid": rng.random((4, 5)) < 0.5}


HYPER = {"alpha": 0.2, "lr": 0.05, "optimizer": "adam", "betas": (0.9, 0.98), "eps": 1e-8,
         "clamp": (-1.0, 1.0), "step": 0, "update": True, "num_threads": 2}
GOOD = object()
C_HYPER = {"alpha": 0.2, "lr": 0.05, "beta1": 0.9, "beta2": 0.98, "eps": 1e-8, "lo": -1.0,
           "hi": 1.0, "optimizer": 0, "step": 0, "update": True, "num_threads": 2}


@st.composite
def calls(draw, names):
    """Keyword arguments where each name is kept good, replaced by garbage or dropped; and
    sometimes an unknown keyword."""
    out = {}
    for name in names:
        how = draw(st.sampled_from(["good", "good", "garbage", "drop"]))
        if how == "good":
            out[name] = GOOD  # filled in by the test
        elif how == "garbage":
            out[name] = draw(_garbage())
    if draw(st.booleans()) and draw(st.booleans()):
        out[draw(st.text(min_size=1, max_size=4))] = draw(_garbage())
    return out


def _state_variant(draw_garbage, n):
    state = numpy_api.init_state(n, init_lambda=0.25)
    for k in list(state):
        g = draw_garbage(k)
        if g is not None:
            state[k] = g
    return state


def _fuzz(fn, kwargs, states):
    before = [{k: (v.tobytes() if isinstance(v, np.ndarray) else repr(v)) for k, v in s.items()}
              for s in states]
    try:
        fn(**kwargs)
    except ALLOWED:
        after = [{k: (v.tobytes() if isinstance(v, np.ndarray) else repr(v))
                  for k, v in s.items()} for s in states]
        assert after == before, "a failed call changed the state"


@pytest.mark.parametrize("backend", ["c", "reference"])
@FAST
@given(calls(["sim", "index", "valid", "state"] + list(HYPER)), st.data())
def test_fuzz_numpy_threshold_step(backend, call, data):
    if backend == "c" and C is None:
        pytest.skip("C extension not built")
    n = data.draw(st.integers(1, 4))
    good = dict(_good(n), **HYPER)
    bad_state = data.draw(st.dictionaries(st.sampled_from(["lambdas", "exp_avg", "exp_avg_sq",
                                                           "steps"]), _garbage(), max_size=2))
    state = numpy_api.init_state(n, init_lambda=0.25)
    state.update(bad_state)
    kwargs = {k: (state if k == "state" else good[k]) if v is GOOD else v
              for k, v in call.items()}
    saved = numpy_api._C
    numpy_api._C = C if backend == "c" else None
    try:
        _fuzz(numpy_api.threshold_step, kwargs, [state])
    finally:
        numpy_api._C = saved


@FAST
@given(calls(["num_samples", "init_lambda"]))
def test_fuzz_init_state(call):
    kwargs = {k: ({"num_samples": 3, "init_lambda": 1.0}[k] if v is GOOD else v)
              for k, v in call.items()}
    # a valid but huge num_samples is a real allocation (gigabytes, written): not a fuzz case;
    # test_init_state_too_large_for_memory covers the size that cannot be allocated
    n = kwargs.get("num_samples")
    assume(not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 10**6))
    _fuzz(numpy_api.init_state, kwargs, [])


def test_init_state_too_large_for_memory(monkeypatch):
    """Addressable but more than the machine holds (64 TiB of state): a MemoryError naming
    num_samples, before anything is allocated, from both the NumPy and the torch layer. The
    guard does not rely on the allocation failing: where the kernel overcommits, the allocation
    succeeds and filling λ would get the process killed."""
    for make in (numpy_api.init_state, glofnd.GloFND):
        with pytest.raises(MemoryError, match=r"num_samples=4398046511104 .*memory and swap"):
            make(2**42)
    # the limit is this machine's memory and swap: with 1 MiB of it, 10^5 samples (1.6 MB) fail
    # and 10^4 (160 kB) fit
    monkeypatch.setattr(_checks, "_memory_bytes", lambda: 2**20)
    for make in (numpy_api.init_state, glofnd.GloFND):
        with pytest.raises(MemoryError, match="num_samples=100000"):
            make(10**5)
    assert numpy_api.init_state(10**4)["lambdas"].shape == (10**4,)
    assert glofnd.GloFND(10**4).lambdas.shape == (10**4,)


def test_init_state_allocation_failure(monkeypatch):
    """Where the platform does not say how much memory it has, an allocation that fails still
    gives the MemoryError naming num_samples."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            if f.read().strip() == "1":
                pytest.skip("the kernel grants every allocation here (vm.overcommit_memory=1)")
    except OSError:
        pass
    monkeypatch.setattr(_checks, "_memory_bytes", lambda: None)
    with pytest.raises(MemoryError, match="num_samples=4398046511104 .*can be allocated"):
        numpy_api.init_state(2**42)


def test_memory_bytes_reads_this_machine():
    """The limit the guard uses: physical memory plus swap, as /proc/meminfo has them (Linux;
    MemTotal leaves out what the kernel reserved for itself, a few percent at most)."""
    have = _checks._memory_bytes()
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        pytest.skip("no /proc/meminfo")
    assert have == pytest.approx(info["MemTotal"] + info.get("SwapTotal", 0), rel=0.05)


@needs_c
@FAST
@given(calls(["sim", "index", "valid", "lambdas", "exp_avg", "exp_avg_sq", "steps"]
             + list(C_HYPER)), st.integers(1, 4))
def test_fuzz_c_step(call, n):
    state = numpy_api.init_state(n, init_lambda=0.25)
    good = dict(_good(n), **state, **C_HYPER)
    kwargs = {k: good[k] if v is GOOD else v for k, v in call.items()}
    _fuzz(C.step, kwargs, [state])
