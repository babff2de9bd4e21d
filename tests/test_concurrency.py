"""Threads: different GloFND states step in parallel with the results of serial calls; calls on
one state are serialised by the module's lock, so the result is that of some serial order."""
from __future__ import annotations

import copy
import itertools
import pickle
import threading
import time

import pytest
import torch

import glofnd
from glofnd import _ops
from glofnd import state as state_mod

N = 12


@pytest.fixture(params=["c", "reference"])
def backend(request, monkeypatch):
    if request.param == "c" and _ops._C is None:
        pytest.skip("C extension not built")
    if request.param == "reference":
        monkeypatch.setattr(_ops, "_backend", "reference")
    return request.param


def _batches(seed, count, rows=24, cols=40, indices=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        sim = torch.rand(rows, cols, generator=g) * 2 - 1
        pool = torch.arange(N) if indices is None else torch.tensor(indices)
        index = pool[torch.randint(len(pool), (rows,), generator=g)]
        out.append((sim, index))
    return out


def _state(fnd):
    return {k: v.clone() for k, v in fnd.named_buffers()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_threads(targets):
    barrier = threading.Barrier(len(targets))
    errors = []

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_two_states_in_parallel_equal_serial(backend):
    # Each thread steps its own module through its own batches; masks and states equal serial runs.
    batches = [_batches(1, 15), _batches(2, 15)]
    serial = []
    for bs in batches:
        fnd = glofnd.GloFND(N, alpha=0.1, lr=0.2)
        serial.append(([fnd.step(s, i)[0] for s, i in bs], _state(fnd)))

    mods = [glofnd.GloFND(N, alpha=0.1, lr=0.2) for _ in batches]
    masks = [[], []]

    def work(k):
        return lambda: masks[k].extend(mods[k].step(s, i)[0] for s, i in batches[k])

    _run_threads([work(0), work(1)])
    for k in range(2):
        assert all(torch.equal(a, b) for a, b in zip(masks[k], serial[k][0], strict=True))
        assert _same(_state(mods[k]), serial[k][1])


class _Probe:
    """Wraps the step's kernels (the C one called directly, and the op): records how many calls
    of either run at once and whether the lock is held."""

    def __init__(self, fnd):
        self.fnd = fnd
        self.active = self.max_active = self.calls = 0
        self.unlocked = 0
        self.guard = threading.Lock()

    def wrap(self, op):
        def call(*args, **kwargs):
            with self.guard:
                self.active += 1
                self.calls += 1
                self.max_active = max(self.max_active, self.active)
                self.unlocked += not self.fnd._lock.locked()
            try:
                time.sleep(0.002)  # widen the window in which an unserialised call would overlap
                return op(*args, **kwargs)
            finally:
                with self.guard:
                    self.active -= 1
        return call


def test_one_state_calls_are_serialised(backend, monkeypatch):
    # Four threads on one module, disjoint indices: every order gives the same state, so the
    # concurrent result must equal the serial one exactly; and no two calls ran at once.
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    batches = [_batches(10 + k, 6, indices=grp) for k, grp in enumerate(groups)]
    ref = glofnd.GloFND(N, alpha=0.1, lr=0.2)
    for bs in batches:
        for s, i in bs:
            ref.step(s, i)

    fnd = glofnd.GloFND(N, alpha=0.1, lr=0.2)
    probe = _Probe(fnd)
    for name in ("_threshold_step_cpu", "threshold_step"):
        monkeypatch.setattr(state_mod._ops, name, probe.wrap(getattr(_ops, name)))
    _run_threads([lambda bs=bs: [fnd.step(s, i) for s, i in bs] for bs in batches])

    assert probe.calls == 24 and probe.max_active == 1 and probe.unlocked == 0
    assert int(fnd.steps.sum()) == int(ref.steps.sum())
    assert _same(_state(fnd), _state(ref))


def test_one_state_overlapping_indices_equal_some_serial_order(backend):
    # Three threads share indices: the final state and each thread's mask equal those of one of
    # the 3! serial orders.
    batches = [_batches(20 + k, 1, indices=[0, 1, 2, 3])[0] for k in range(3)]
    fnd = glofnd.GloFND(N, alpha=0.2, lr=0.3)
    masks = [None] * 3

    def work(k):
        def run():
            masks[k] = fnd.step(*batches[k])[0]
        return run

    _run_threads([work(k) for k in range(3)])
    final = _state(fnd)

    matches = []
    for order in itertools.permutations(range(3)):
        ser = glofnd.GloFND(N, alpha=0.2, lr=0.3)
        ser_masks = [None] * 3
        for k in order:
            ser_masks[k] = ser.step(*batches[k])[0]
        if _same(_state(ser), final) and all(torch.equal(a, b) for a, b in zip(masks, ser_masks)):
            matches.append(order)
    assert matches, "the concurrent result is not that of any serial order"
    assert int(fnd.steps.sum()) == 3 * 4  # three calls, each visiting indices 0..3 once


def test_copies_have_their_own_lock():
    fnd = glofnd.GloFND(N)
    for other in (copy.deepcopy(fnd), pickle.loads(pickle.dumps(fnd))):
        assert other._lock is not fnd._lock
        with fnd._lock:
            assert not other._lock.locked()
        other.step(torch.rand(3, 4), torch.tensor([0, 1, 2]))
