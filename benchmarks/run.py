#!/usr/bin/env python
"""Benchmarks of glofnd: one entry point that prints Markdown tables and writes docs/benchmarks.md.

    python benchmarks/run.py                 # every section (~3 min on 2 cores)
    python benchmarks/run.py --quick         # fewer sizes and repeats, no torch.compile (~20 s)
    python benchmarks/run.py --only a,d      # some sections; the others in the file are kept
    python benchmarks/run.py --only c,e --device cuda   # the losses on a GPU (sections c-cuda, e-cuda)

Method: the variants of one table run interleaved, one after another inside each repeat (the
order rotates between repeats), so that a change of machine load affects all of them alike;
each figure is the median over repeats of the mean time per call over a short inner loop, with
the 25th-75th percentile range beside it; every ratio compares medians of the same run.

Sections live in a registry (``SECTIONS``, filled by ``@section``); a new one is a function
returning Markdown lines: a (threshold step against eager PyTorch), b (against the time to
read the similarity matrix once), c (the whole loss step with GloFND against the same loss
with nothing masked), d (the threshold step against the data-set size N), e (peak memory of
the loss step with and without GloFND, each measured in a child process of this script).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # the glofnd of this checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

import glofnd  # noqa: E402
from glofnd.state import _columns, _new_block  # noqa: E402
from glofnd import GloFNDClipLoss, GloFNDLoss, _ops, numpy_api, reference  # noqa: E402
from eager_baseline import eager_threshold_step  # noqa: E402

try:
    from glofnd import _C
except ImportError:
    _C = None

DOC = os.path.join(ROOT, "docs", "benchmarks.md")
STATE_KEYS = ("lambdas", "exp_avg", "exp_avg_sq", "steps")


# ------------------------------------------------------------------------------------ timing

def measure(variants: dict[str, Callable[[], object]], repeats: int,
            min_time: float) -> dict[str, tuple[list[float], list[float]]]:
    """Seconds per call of each variant, one sample per repeat, variants interleaved:
    name -> (wall-clock samples, CPU-time samples of the calling thread).

    Each variant is warmed up, then its inner loop length is set so that one sample lasts about
    ``min_time``. In repeat r the variants run in the order of the list rotated by r. The CPU
    time of the calling thread leaves out the time the thread waited for a core while other
    processes ran; it is the whole cost only when the variant runs on that one thread."""
    inner = {}
    for name, fn in variants.items():
        fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inner[name] = max(1, min(2000, int(min_time / max(dt, 1e-7))))
    names = list(variants)
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, n = variants[name], inner[name]
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(n):
                fn()
            t1, c1 = time.perf_counter(), time.thread_time()
            samples[name][0].append((t1 - t0) / n)
            samples[name][1].append((c1 - c0) / n)
    return samples


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """25th-75th percentile range in µs."""
    if len(xs) < 2:
        return "-"
    q = statistics.quantiles(xs, n=4)
    return f"{q[0] * 1e6:.0f}-{q[2] * 1e6:.0f}"


def us(x: float) -> str:
    return f"{x * 1e6:.1f}" if x < 1e-4 else f"{x * 1e6:.0f}"


STALL = ("; not meaningful: this 2-thread time is over 5x the 1-thread one, i.e. dominated by "
         "waiting for a core (see the note on OpenMP at the top)")


def stalled(rows: list[list], key: Callable[[list], object], col: int, row: list,
            threads_col: int = 1) -> str:
    """STALL when row (threads > 1) took over 5x its 1-thread twin (same key), else ""."""
    if row[threads_col] == 1:
        return ""
    twin = [r for r in rows if r[threads_col] == 1 and key(r) == key(row)]
    if not twin:
        return ""
    t2, t1 = float(str(row[col]).split()[0]), float(str(twin[0][col]).split()[0])
    return STALL if t2 > 5 * t1 else ""


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# ---------------------------------------------------------------------------------- fixtures

def batch(b: int, n: int, seed: int = 0):
    """B anchors with two view rows each: sim (2B, 2B) float32 in [-1, 1), index = cat(idx, idx)."""
    gen = torch.Generator().manual_seed(seed)
    sim = torch.rand(2 * b, 2 * b, generator=gen) * 2 - 1
    idx = torch.randperm(n, generator=gen)[:b]
    return sim, idx, torch.cat([idx, idx])


def touched_state(n: int) -> dict:
    """A state of four separate contiguous NumPy arrays, all pages written (np.zeros pages would
    fault on first use)."""
    st = {k: np.ascontiguousarray(v) for k, v in numpy_api.init_state(n).items()}
    for k in ("exp_avg", "exp_avg_sq", "steps"):
        st[k][:] = 0
    return st


def touched_glofnd_state(n: int) -> dict:
    """The state as ``glofnd.GloFND`` keeps it on the CPU (λ, m, v and the count the columns of
    one (n, 4) float32 block), as NumPy views, all pages written."""
    block = _new_block(n)
    block.fill_(0)
    block[:, 0].fill_(1.0)
    return {name: t.numpy() for name, t in zip(("lambdas", "exp_avg", "exp_avg_sq", "steps"),
                                                _columns(block))}


def touched_three_column_state(n: int) -> dict:
    """GloFND's CPU layout before the (n, 4) block: λ, m, v the columns of an (n, 3) float32
    block and the counts a separate int32 vector, both allocated through NumPy, pages written."""
    block = np.zeros((n, 3), dtype=np.float32)
    block[:, 0] = 1.0
    steps = np.zeros(n, dtype=np.int32)
    steps[:] = 0
    return {"lambdas": block[:, 0], "exp_avg": block[:, 1], "exp_avg_sq": block[:, 2],
            "steps": steps}


def warm_state(n: int, seed: int) -> dict:
    """A state that has already moved, so λ lies among the similarities (agreement checks)."""
    rng = np.random.default_rng(seed)
    return {"lambdas": rng.uniform(-0.3, 0.3, n).astype(np.float32),
            "exp_avg": rng.normal(0, 0.05, n).astype(np.float32),
            "exp_avg_sq": rng.uniform(0, 0.01, n).astype(np.float32),
            "steps": rng.integers(1, 30, n).astype(np.int32)}


def c_call(a, ix, st, threads):
    return lambda: _C.step(a, ix, None, st["lambdas"], st["exp_avg"], st["exp_avg_sq"],
                           st["steps"], num_threads=threads)


def reference_call(fnd, sim, index):
    def run():
        _ops._backend = "reference"
        try:
            return fnd(sim, index)
        finally:
            _ops._backend = "c"
    return run


def try_compile(fn, args):
    """torch.compile(fn) after one traced call, or (None, reason) when it does not work here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(fn, dynamic=False)
            t0 = time.perf_counter()
            compiled(*args)
            return compiled, time.perf_counter() - t0
    except Exception as exc:  # report why, whatever it is
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}: {first[:200]}"


# --------------------------------------------------------------------------------- registry

SECTIONS: dict[str, tuple[str, Callable]] = {}


def section(key: str, title: str):
    """Registers a section: fn(cfg) -> list of Markdown lines."""
    def deco(fn):
        SECTIONS[key] = (title, fn)
        return fn
    return deco


def agreement(b: int, n: int) -> dict[str, str]:
    """One step from the same warm state: C and eager against the reference."""
    sim, idx, index = batch(b, n, seed=1)
    ws = warm_state(n, seed=2)
    ref = {k: torch.from_numpy(v.copy()) for k, v in ws.items()}
    rmask, rkept = reference.threshold_step(sim, index, None, *(ref[k] for k in STATE_KEYS),
                                            0.01, 0.05, 0.9, 0.98, 1e-8, -1.0, 1.0,
                                            reference.ADAM, 0, True)
    out = {}
    if _C is not None:
        cs = {k: v.copy() for k, v in ws.items()}
        cmask, ckept = c_call(sim.numpy(), index.numpy(), cs, 1)()
        same = (cmask.tobytes() == rmask.numpy().tobytes() and np.array_equal(ckept, rkept)
                and all(cs[k].tobytes() == ref[k].numpy().tobytes() for k in STATE_KEYS))
        out["c"] = "bytes equal" if same else "DIFFERENT"
    es = {k: torch.from_numpy(v.copy()) for k, v in ws.items()}
    emask = eager_threshold_step(sim, idx, *(es[k] for k in STATE_KEYS))
    dlam = (es["lambdas"] - ref["lambdas"]).abs().max().item()
    out["eager"] = f"max abs dλ {dlam:.1e}, {int((emask != rmask).sum())} mask entries differ"
    return out


@section("a", "Threshold step: fused C kernel against eager PyTorch")
def section_a(cfg) -> list[str]:
    n = 100_000
    lines = [
        f"One threshold step (λ update of the batch's samples, then the mask) for B anchors with "
        f"two view rows each: sim is (2B, 2B) float32 in [-1, 1), index = cat(idx, idx) with idx "
        f"drawn from N = {n:,} samples, no validity mask. Variants: `glofnd.GloFND` on CPU "
        f"tensors (C kernel through the torch op), `glofnd._C.step` on NumPy arrays (the kernel "
        f"with the binding only), the eager PyTorch baseline `benchmarks/eager_baseline.py` "
        f"(gather, compare, count, Adam, clamp, scatter, compare), `torch.compile` of that "
        f"baseline, and glofnd's pure-torch reference path "
        f"(`glofnd.use_backend('reference')`). Each variant "
        f"keeps its own state, updated on every call. Speed-up = eager median / variant median. "
        f"With 1 thread, the CPU time of the calling thread is given too: it leaves out the time "
        f"spent waiting for a core on this shared machine.",
        "",
    ]
    notes = []
    rows = []
    for b in cfg.sizes:
        sim, idx, index = batch(b, n)
        a, ix = sim.numpy(), index.numpy()
        agree = agreement(b, n)
        for threads in cfg.threads:
            torch.set_num_threads(threads)
            variants = {}
            if _C is not None:
                variants["glofnd.GloFND (C)"] = (lambda f=glofnd.GloFND(n): f(sim, index))
                variants["glofnd._C.step"] = c_call(a, ix, touched_state(n), threads)
            es = [torch.ones(n), torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.int32)]
            variants["eager PyTorch"] = lambda es=es: eager_threshold_step(sim, idx, *es)
            if cfg.compile:
                cs = [torch.ones(n), torch.zeros(n), torch.zeros(n),
                      torch.zeros(n, dtype=torch.int32)]
                compiled, info = try_compile(eager_threshold_step, (sim, idx, *cs))
                if compiled is None:
                    notes.append(f"torch.compile failed at B={b}, {threads} thread(s): {info}")
                else:
                    variants["torch.compile(eager)"] = (lambda c=compiled, cs=cs:
                                                        c(sim, idx, *cs))
                    notes.append(f"torch.compile at B={b}, {threads} thread(s): first call "
                                 f"(compilation) {info:.1f} s")
            variants["glofnd reference (torch)"] = reference_call(glofnd.GloFND(n), sim, index)
            res = measure(variants, cfg.repeats, cfg.min_time)
            eager, eager_cpu = (med(x) for x in res["eager PyTorch"])
            for name, (xs, cs) in res.items():
                check = {"glofnd.GloFND (C)": agree.get("c", ""),
                         "glofnd._C.step": agree.get("c", ""),
                         "eager PyTorch": agree["eager"]}.get(name, "")
                cpu = (f"{us(med(cs))} ({eager_cpu / med(cs):.1f}x)" if threads == 1 else "-")
                rows.append([b, threads, name, us(med(xs)), spread(xs),
                             f"{eager / med(xs):.1f}x", cpu, check])
            print(f"  a: B={b} threads={threads} done", file=sys.stderr)
    lines += table(["B", "threads", "variant", "median µs", "p25-p75 µs",
                    "speed-up vs eager", "CPU µs, 1 thread (speed-up)",
                    "agreement with the reference (one step)"], rows)
    for r in rows:
        if r[0] == 512 and r[2] in ("glofnd.GloFND (C)", "glofnd._C.step"):
            x = float(r[5].rstrip("x"))
            notes.append(f"target >= 10x eager at B = 512, {r[2]}, {r[1]} thread(s): "
                         f"{x:.1f}x (wall clock), {'met' if x >= 10 else 'missed'}"
                         + stalled(rows, lambda q: (q[0], q[2]), 3, r))
    if not cfg.compile:
        notes.append("torch.compile not measured (--quick: compilation takes tens of seconds)")
    slower = [r for r in rows if r[2] == "torch.compile(eager)" and float(r[5].rstrip("x")) < 1]
    if slower:
        notes.append("torch.compile(eager) ran slower than eager in "
                     f"{len(slower)} of the rows: its generated C++ can be inspected with "
                     "TORCH_LOGS=output_code (with torch 2.13 on the machine of the first runs, "
                     "perf showed the final bool mask written by a scalar loop, one setp/mov per "
                     "entry, while the counting loop was vectorised)")
    lines += [""] + [f"- {x}" for x in notes]
    return lines


@section("b", "Threshold step against the time to read the similarity matrix once")
def section_b(cfg) -> list[str]:
    lines = [
        "The step must read every similarity at least once, so the time of one read of the same "
        "(2B, 2B) float32 matrix bounds it from below. The bound here is the faster of two "
        "single-pass reductions that do nothing but read: `numpy.max` (one thread, SIMD, no "
        "dependency between lanes; `numpy.sum` is slower because of its pairwise summation, so "
        "it would flatter the step) and `torch.amax` (vectorised, using the benchmark's thread "
        "count). The step also writes the (2B, 2B) bool mask, a quarter of the bytes it reads, "
        "which the bound leaves out. At B = 128 and 512 the matrix fits in the L2/L3 caches, as "
        "it does in training right after the matmul that produced it; at B = 2048 (64 MiB) it "
        "comes from memory. Fraction of the bound = bound / step time (1.0 = as fast as a read). "
        "The last column repeats the ratio in CPU time of the calling thread (1 thread only).",
        "",
    ]
    if _C is None:
        return lines + ["The C extension is not built: nothing to measure."]
    n = 100_000
    rows = []
    for b in cfg.sizes:
        sim, idx, index = batch(b, n)
        a, ix = sim.numpy(), index.numpy()
        for threads in cfg.threads:
            torch.set_num_threads(threads)
            variants = {
                "numpy.max": lambda: a.max(),
                "torch.amax": lambda: torch.amax(sim),
                "_C.step": c_call(a, ix, touched_state(n), threads),
                "GloFND": (lambda f=glofnd.GloFND(n): f(sim, index)),
            }
            res = measure(variants, cfg.repeats, cfg.min_time)
            t = {k: med(v[0]) for k, v in res.items()}
            c = {k: med(v[1]) for k, v in res.items()}
            which = min(("numpy.max", "torch.amax"), key=lambda k: t[k])
            bound = t[which]
            gbs = a.nbytes / bound / 1e9
            cpu = "-"
            if threads == 1:
                cb = min(c["numpy.max"], c["torch.amax"])
                cpu = f"{us(c['_C.step'])} / {us(cb)} = {c['_C.step'] / cb:.2f}x"
            rows.append([b, threads, f"{us(t['numpy.max'])} / {us(t['torch.amax'])}",
                         f"{us(bound)} ({which}, {gbs:.0f} GB/s)",
                         f"{us(t['_C.step'])} ({spread(res['_C.step'][0])})",
                         f"{t['_C.step'] / bound:.2f}x", f"{bound / t['_C.step']:.2f}",
                         f"{us(t['GloFND'])}", f"{t['GloFND'] / bound:.2f}x", cpu])
            print(f"  b: B={b} threads={threads} done", file=sys.stderr)
    lines += table(["B", "threads", "numpy.max / torch.amax µs", "bound µs",
                    "_C.step µs (p25-p75)", "_C.step / bound", "fraction of bound",
                    "GloFND µs", "GloFND / bound", "CPU µs, 1 thread: _C.step / bound"], rows)
    lines.append("")
    for r in rows:
        x = float(r[5].rstrip("x"))
        lines.append(f"- target _C.step within 2x of the bound, B = {r[0]}, {r[1]} thread(s): "
                     f"{x:.2f}x (wall clock), {'met' if x <= 2 else 'missed'}"
                     + stalled(rows, lambda q: q[0], 4, r))
    lines += ["", B_NOTES]
    return lines


B_NOTES = """\
How the step spends its time (1 thread, measured 2026-11-27 with perf, with rdtsc inside the \
kernel, and on builds with parts stubbed out). At B = 512 (4 MiB, in L3) the kernel counts a \
batch of groups' rows while it writes the flags of the previous batch's rows, which are still \
in L1, in one loop, then updates the batch's λ together (docs/algorithm.md); that loop is \
about two thirds of the step and reads the counted row at about the bound's rate. The λ \
updates cost ~5-7 µs (Adam's divisions and square root: with plain SGD the step is ~5 µs \
shorter), the grouping ~2 µs. At B = 128 (256 KiB, in L2) the matrix takes a path of its own \
(two whole-matrix passes in memory order: counts, all updates, flags). Its parts, in one \
process (rdtsc inside the kernel, before its state prefetch was dropped): the count pass \
2.3 µs, the flags 1.8, the updates 1.0, \
the call through the binding 0.5, the grouping 0.2. Numpy's own loop reads the matrix in \
~2.1 µs of the bound's 3.0 (the rest is the call), and a count or flags pass alone runs at \
that rate in a C loop on hot data (1.3-1.7 µs): with two reads, the updates and the fixed \
costs the step sits just under 2x the bound at that size.

Changes measured since the previous run (CPU time, medians of 4-6 alternating processes, each \
checkout's own build): a one-thread call no longer enters an OpenMP region, which made a futex \
system call every time, and the binding parses its own arguments (a keyword argument made and \
hashed a str per name): together B = 128 8.3 -> 7.2 µs and a 2 x 2 step 1.85 -> 0.57 µs. The \
two-pass path for small matrices: B = 64 3.09 -> 2.74 µs, B = 128 7.26 -> 6.95, B = 180 \
14.7 -> 14.1; without its own prefetch of the state, B = 128 6.62 -> 6.23. Grouping the \
rows with shortcuts for two views and for distinct indices (no sort): B = 128 6.80 -> 6.53 \
µs, B = 512 80.9 -> 76.7. The count pass of small matrices loading each vector once (GCC \
had loaded each twice): B = 128 5.96 -> 5.61 µs. A sim that NumPy aligned to 16 bytes only \
(this benchmark's is aligned to 64) made every load of the batched loop read two lines: \
B = 512 78 -> 92 µs; the loop now takes the entries before the first boundary apart, 86 µs. \
Tried and dropped this time: the same for the small-matrix passes (the aligned B = 128 step \
5.67 -> 6.01 µs); all of a small matrix's Adam updates in \
AVX-512 lanes, the state gathered into arrays first (B = 128 6.10 -> 6.01 µs, within noise); Adam's arithmetic for a batch of 8 groups in \
AVX-512 lanes (B = 128 7.8 -> 8.3 µs, B = 512 80 -> 87: a vector division of doubles costs \
more here than 8 scalar ones, and the lanes are filled through memory); a 64-byte aligned \
mask (no change); software prefetch in the small-matrix passes (no change). Before: batches of \
32-48 KiB of rows (the flagged rows no longer in L1), a lag between a group's count and its \
mask without batching the updates, counting with popcounts in the batched loop.

Since (commit 197ce92): the batched loop prefetches 2 KiB ahead instead of 4 KiB when the \
matrix is at most 8 MiB, so stays in L3 between steps; 4 KiB had fetched its lines too early \
there. B = 512: 74.4 -> 73.0 and 77.1 -> 73.8 µs in two A/Bs; B = 2048 unchanged (3108 against \
3137 µs, 5 rounds). The bound itself moves between processes: numpy.max read this 4 MiB \
matrix in 35-36 µs in some processes and 39-45 µs in others (the matrix 64-byte aligned in \
each), while the step does not move with it, so B = 512 lands on either side of 2x.

Since (commit ebf6bf5): the step's batches hold 8 KiB of rows instead of 16 KiB, one group of \
two 4 KiB rows at B = 512. Rows of a power-of-two size all take lines in the same L1 sets, and \
two batches of 16 KiB (the one counted, the one masked) filled 8 of the 12 ways before the \
mask's and the prefetched lines. One thread, CPU time, alternating processes: B = 512 \
73.3 -> 68.1 and 74.3 -> 71.0 µs in two A/Bs, B = 256 23.7 -> 21.3 µs, B = 200 and 384 within \
noise; with 2 threads B = 512 went from 50.2 to 41.9 µs in the section's own run. The parts \
at B = 512 after it (one thread): a pass that only counts, plus the updates, 51 µs; the \
update=False step (one pass that writes the mask) 58-60 µs, against ~37 µs for numpy.max, \
so writing the 1 MiB mask (its lines read for ownership, then written back) costs about as \
much as 2 MiB of reading; plain SGD instead of Adam 62-64 µs, Adam 68-71 µs. Tried and \
dropped: masking a batch two batches after its count, so that an update overlaps a whole \
loop (78.6 against 69.6 µs, and 81 with 16 KiB batches); the flags not depending on the \
update at all (an unsafe probe: 71.9 against 70.9 µs, so Adam's cost is not the wait for the \
new λ); a count-only lead at the start of each batch's loop (slower by 3-7 µs); the two rows \
of a group counted in one loop (74.7 against 72.3 µs); prefetchw of the mask's lines \
(no change); the fused loop compiled without GCC's extra loads and register copies \
(35 instead of 41 instructions per 64 entries: no change, the loop waits on memory); \
Adam's updates of a small matrix in AVX-512 lanes again (B = 128 5.97 -> 5.93 µs: \
measured alone, 128 updates took 0.92-1.02 µs scalar and 1.06-1.08 µs in lanes).

Since (commit d537ca8): Adam's bias corrections 1 - β^t are kept in a table of 32 slots by t \
per call instead of for the last t only. This benchmark's state has per-sample counts that \
all differ, which missed every time and cost little (a branch that always goes the same way); \
two values of t mixed at random in a batch, as in training where an epoch left some samples \
out, made the step 50% slower at B = 128 (8.71 against 5.77 µs) and 8-17% at B = 512, and \
now cost nothing (5.75 and 72.8 µs, one thread, CPU time)."""


@section("d", "Threshold step against the data-set size N")
def section_d(cfg) -> list[str]:
    b = 512
    ns = [10**3, 10**4, 10**5, 10**6, 10**7] if not cfg.quick else [10**3, 10**5, 10**7]
    pool = 16
    lines = [
        f"The step at B = {b} (sim (2B, 2B) float32, two view rows per anchor) with the state "
        f"sized N. Each call draws fresh indices (a pool of {pool} draws of B distinct samples "
        f"out of N, cycled), so at large N every state access is a cache and TLB miss, as in "
        f"training. State pages are written once before timing. The cost must not grow with N; "
        f"ratio = median / median at N = 10^3. {'' if cfg.quick else '45 repeats per figure.'}",
        "",
    ]
    if _C is None:
        return lines + ["The C extension is not built: nothing to measure."]
    rng = np.random.default_rng(0)
    sim = (torch.rand(2 * b, 2 * b, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    a = sim.numpy()
    draws = {n: [np.concatenate([i, i]) for i in (rng.choice(n, b, replace=False)
                                                  for _ in range(pool))] for n in ns}
    layouts = {"GloFND": touched_glofnd_state, "(N, 3) + steps": touched_three_column_state,
               "separate": touched_state}
    states = {(lay, n): make(n) for lay, make in layouts.items() for n in ns}
    rows = []
    for threads in cfg.threads:
        variants = {}
        for lay in layouts:
            for n in ns:
                st, ixs, k = states[lay, n], draws[n], [0]

                def call(st=st, ixs=ixs, k=k, threads=threads):
                    k[0] = (k[0] + 1) % len(ixs)
                    return _C.step(a, ixs[k[0]], None, st["lambdas"], st["exp_avg"],
                                   st["exp_avg_sq"], st["steps"], num_threads=threads)
                variants[lay, n] = call
        # more repeats than elsewhere: the target is a ratio of 1.10, and the spread of one
        # run's samples at 15 repeats reached +-5% (2026-11-27)
        res = measure(variants, cfg.repeats if cfg.quick else 45, cfg.min_time)
        for lay in layouts:
            base, cbase = med(res[lay, ns[0]][0]), med(res[lay, ns[0]][1])
            for n in ns:
                wall, cpu = res[lay, n]
                rows.append([lay, f"10^{int(round(np.log10(n)))}", threads, us(med(wall)),
                             spread(wall), f"{med(wall) / base:.2f}",
                             f"{us(med(cpu))} ({med(cpu) / cbase:.2f})" if threads == 1
                             else "-"])
        print(f"  d: threads={threads} done", file=sys.stderr)
    lines += table(["state layout", "N", "threads", "_C.step median µs", "p25-p75 µs",
                    "ratio to N = 10^3", "CPU µs, 1 thread (ratio)"], rows)
    lines.append("")
    for r in rows:
        if r[1] == "10^7":
            x = float(r[5])
            lines.append(f"- target N = 10^7 within 10% of N = 10^3, {r[0]} layout, {r[2]} "
                         f"thread(s): {x:.2f} (wall clock), {'met' if x <= 1.10 else 'missed'}"
                         + stalled(rows, lambda q: q[:2], 3, r, threads_col=2))
            if r[2] == 1:
                xc = float(r[6].split("(")[1].rstrip(")"))
                lines.append(f"- the same in CPU time, 1 thread: {xc:.2f}, "
                             f"{'met' if xc <= 1.10 else 'missed'}")
    lines += ["", "Layouts: `GloFND` is the state as `glofnd.GloFND` keeps it: λ, m, v and the "
              "count t the columns of one (N, 4) float32 block (t's int32 bits in the last), "
              "16 aligned bytes per sample, one cache line. `(N, 3) + steps` is GloFND's "
              "layout before it (commit 069e5f2): λ, m and v in an (N, 3) block (12 bytes; 2 "
              "samples in 16 straddle two lines) and the counts a separate int32 vector, about "
              "two lines per sample. `separate` is four separate contiguous arrays (the "
              "NumPy API's layout before its init_state made a block too): four lines per "
              "sample. All three are allocated through NumPy, whose allocator asks for "
              "transparent huge pages on large blocks (checked in "
              "/proc/self/smaps: 153.6 of the 160 MB of an (N, 4) block at N = 10^7 on huge "
              "pages), as GloFND allocates its block; in a run of this section with the block "
              "allocated by torch (no huge pages; 2026-11-27), the (N, 3) layout measured 1.25 "
              "at N = 10^7 (1 thread). From 2^18 samples on, the kernels prefetch the state "
              "entries of the whole batch before the first group runs, so that all of the "
              "batch's misses are in flight together (and each group's four groups ahead). "
              "What is left at N = 10^7 grows with the lines per sample: those misses hold the "
              "core's miss buffers, which the stream of the matrix needs too. Prefetching them "
              "into L2 only (prefetcht1, t2) or non-temporally measured the same as into L1 "
              "(one thread, 4 rounds of alternating processes, 2026-11-27); 8 or 16 groups "
              "ahead instead of 4 had measured the same before.",
              "",
              "The baseline N = 10^3 runs slower than N = 10^4 - 10^5 in every layout: by 2-3% "
              "with 1 thread and 7-10% with 2 (runs of 2026-11-27). With 2 threads the two "
              "threads' groups also write state lines in common (half of the 1000 samples are "
              "in every batch, several to a line), which likely accounts for the larger gap. "
              "The target is the ratio to N = 10^3, as stated; against N = 10^4 the ratios "
              "at N = 10^7 are a few per cent higher (compare the rows).",
              "",
              "History: with the (N, 3) layout this section measured 1.09-1.23 at N = 10^7 "
              "before the whole-batch prefetch (commit 9441020), 1.01-1.03 after it, and "
              "1.11-1.12 once the step at small N got faster (commits ebf6bf5, d537ca8: the 8 KiB "
              "batches and the bias-correction table, which computes each value of t once per "
              "call instead of once per sample, which the misses at N = 10^7 had hidden). The "
              "(N, 4) block took it to 1.02-1.03 (1 thread) in three runs of this section "
              "(2026-11-27), the old layout 1.09 in the same runs. With 2 threads the whole "
              "batch's state had been prefetched by the calling thread, into its own core's "
              "caches, before the threads split the groups; each thread now prefetches the "
              "state of the chunk of groups it takes, when it takes it (commit 7f988c6): "
              "N = 10^7 against N = 10^4 went from 1.09-1.17 to 1.03-1.06 in 4 rounds of "
              "alternating processes, against N = 10^3 from 1.04-1.13 to 0.99-1.01 (2026-11-27)."]
    return lines


# ------------------------------------------------------------------------------ the losses

LOSSES = ("simclr", "sogclr", "clip")  # GloFNDLoss(base=...), GloFNDClipLoss(base="clip")
FEATURES = 128
NOISE = 1.5  # second view = first + NOISE x N(0, 1): positives at cosine ~0.55


def loss_sizes(cfg) -> list[int]:
    """B of the loss sections: 256 and 1024 on the CPU; on a GPU also 4096 (SimCLR's batch)."""
    if cfg.quick:
        return [256]
    return [256, 1024] if cfg.device == "cpu" else [256, 1024, 4096]


def make_loss(base: str, method: str, n: int):
    if base == "clip":
        return GloFNDClipLoss(n, method=method, base="clip")
    return GloFNDLoss(n, method=method, base=base)


def loss_case(base: str, b: int, n: int, device: str, seed: int = 0):
    """Inputs of one loss step: two (B, 128) float32 feature blocks that require grad (the
    second a noisy copy of the first, so that positives are close), B distinct indices, and
    the call ``step(loss)``: forward and backward, gradients of the last call dropped."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, FEATURES, generator=gen)
    x1 = x0 + NOISE * torch.randn(b, FEATURES, generator=gen)
    z0 = x0.to(device).requires_grad_()
    z1 = x1.to(device).requires_grad_()
    idx = torch.randperm(n, generator=gen)[:b].to(device)
    scale = torch.tensor(100.0, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(loss):
        z0.grad = z1.grad = None
        value = loss(z0, z1, scale, idx) if base == "clip" else loss(z0, z1, idx)
        value.backward()
        sync()
        return value
    return step, (z0, z1, idx)


def warm_lambdas(loss, inputs) -> None:
    """λ of every sample at the (1 − α)-quantile of the batch's negative cosines, so that about
    α of the negatives are flagged from the first timed step on (as in training once λ has
    settled; from λ = 1 nothing would be flagged). Each timed call updates λ as usual."""
    z0, z1 = inputs[0].detach(), inputs[1].detach()
    a = torch.nn.functional.normalize(z0.float(), dim=1)
    c = torch.nn.functional.normalize(z1.float(), dim=1)
    sim = a @ c.T if isinstance(loss, GloFNDClipLoss) else torch.cat([a, c]) @ torch.cat([a, c]).T
    off = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    q = torch.quantile(sim[off].cpu()[:2**24], 1 - loss.alpha).item()
    for m in loss.modules():
        if isinstance(m, glofnd.GloFND):
            m.lambdas.fill_(q)


@section("c", "The loss step with GloFND against the same loss with nothing masked")
def section_c(cfg) -> list[str]:
    dev = cfg.device
    cuda = dev.startswith("cuda")
    n = 100_000
    sizes = loss_sizes(cfg)
    threads = [None] if cuda else cfg.threads
    lines = [
        f"One training step of the loss on {dev}: forward and backward from B features per view "
        f"(D = {FEATURES}, float32, requires_grad), for `GloFNDLoss(base='simclr')`, "
        f"`GloFNDLoss(base='sogclr')` (sim (2B, 2B)) and `GloFNDClipLoss(base='clip')` "
        f"(two (B, B) directions), with `method='glofnd'` (N = {n:,}; λ started at the "
        f"quantile so that about α of the negatives are flagged and removed, and updated on "
        f"every call) against `method='none'` (the base loss, same code path otherwise). "
        f"Defaults otherwise (α = 0.01, CLIP α = 0.001, check_index on). The two variants run "
        f"interleaved. Overhead = glofnd / none − 1, from the medians of the same run; the "
        f"p25-p75 column is the spread of the per-repeat ratios (each repeat times both "
        f"variants back to back), i.e. how far one run's figure can be trusted.",
        "",
    ]
    if not cuda:
        lines += ["With 1 thread the overhead is taken from the CPU time of the calling thread "
                  "(it leaves out the time the thread waited for a core on this shared "
                  "machine); the wall-clock figure is beside it. The 2-thread rows are wall "
                  "clock only and are often unusable here (see the note on OpenMP at the top).",
                  ""]
    rows = []
    verdicts = []
    for base in LOSSES:
        for b in sizes:
            step, inputs = loss_case(base, b, n, dev)
            losses = {m: make_loss(base, m, n).to(dev) for m in ("glofnd", "none")}
            warm_lambdas(losses["glofnd"], inputs)
            ops = {m: count_ops(lambda f=f: step(f)) for m, f in losses.items()}
            for t in threads:
                if t is not None:
                    torch.set_num_threads(t)
                res = measure({m: (lambda f=f: step(f)) for m, f in losses.items()},
                              cfg.repeats if cfg.quick else 31, cfg.min_time)
                use_cpu = t == 1
                k = 1 if use_cpu else 0
                g, o = med(res["glofnd"][k]), med(res["none"][k])
                paired = [x / y - 1 for x, y in zip(res["glofnd"][k], res["none"][k])]
                q = statistics.quantiles(paired, n=4)
                gw, ow = med(res["glofnd"][0]), med(res["none"][0])
                stats = losses["glofnd"].last_stats
                share = stats.get("removed", stats.get("image_removed", float("nan")))
                over = g / o - 1
                rows.append([base, b, "-" if t is None else t,
                             "CPU" if use_cpu else "wall",
                             f"{us(o)}", f"{us(g)}", f"{100 * over:+.1f}%",
                             f"{100 * q[0]:+.1f}% to {100 * q[2]:+.1f}%",
                             f"{us(ow)} / {us(gw)} ({100 * (gw / ow - 1):+.1f}%)"
                             if use_cpu else "-", f"{100 * share:.2f}%",
                             f"{ops['none']} / {ops['glofnd']}"])
                if t in (1, None):
                    verdicts.append((base, b, t, over, q))
                print(f"  c: {base} B={b} threads={t} done", file=sys.stderr)
    lines += table(["loss", "B", "threads", "clock", "none µs", "glofnd µs", "overhead",
                    "per-repeat overhead p25-p75", "wall µs none / glofnd, 1 thread",
                    "removed (last step)", "torch ops per step, none / glofnd"], rows)
    lines.append("")
    for r in rows:
        if r[2] == 2:
            twin = [q for q in rows if q[2] == 1 and q[:2] == r[:2]]
            if twin and float(r[4]) > 5 * float(twin[0][4]):
                lines.append(f"- {r[0]}, B = {r[1]}, 2 threads" + STALL)
    for base, b, t, over, q in verdicts:
        noisy = (f" (noisy: the per-repeat overhead spans {100 * q[0]:+.1f}% to "
                 f"{100 * q[2]:+.1f}%)" if q[2] - q[0] > 0.10 else "")
        lines.append(f"- target GloFND adds at most 5% to the loss step, {base}, B = {b}"
                     f"{'' if t is None else ', 1 thread (CPU time)'}: {100 * over:+.1f}%, "
                     f"{'met' if over <= 0.05 else 'missed'}{noisy}")
    for paragraph in (CUDA_LOSS_NOTES if cuda else LOSS_NOTES):
        lines += ["", paragraph]
    return lines


CUDA_LOSS_NOTES = """How the loss step runs on a GPU: the losses run glofnd's pure-torch \
reference there (no custom kernels), so a step is a sequence of small torch operations, and up \
to B = 4096 their launch from Python (about 10-20 µs of host time each on this machine) \
costs more than their work on the GPU: the `none` column hardly grows from B = 256 to 4096. \
GloFND adds the operations of the last column (the counts against λ, the grouping by index, \
Adam, the mask and the kept counts, and the mask's use in the loss and its backward). The overhead is that launch cost, not memory traffic.

The run before this one (2026-11-27 03:11 UTC, the same kind of card, the code before commit \
95ad20d) measured simclr +93.5% / +94.8% / +62.7%, sogclr +57.3% / +64.3% / +53.2%, clip \
+137.6% / +174.3% / +158.9% at B = 256 / 1024 / 4096. Since then the reference dispatches \
fewer operations (one table gather for both bias corrections, grouping by sort + searchsorted, \
kept = valid - flagged from the counts it already has, validity as |s| < inf) and λ's step no \
longer reads the index range a second time inside the losses.

Before the reference path was freed of host synchronisation (commit 7b10989, an H100 80GB HBM3 \
of the same kind, 2026-11-27 02:58 UTC, same command), the overheads were: simclr +187.5% / \
+153.5% / +109.0%, sogclr +110.8% / +104.3% / +89.0%, clip +291.4% / +285.5% / +253.4% at B = \
256 / 1024 / 4096. Adam's bias correction then ran a loop with one host sync per bit of the \
step count (about 20 syncs and 140 launches per call once the counts reached ~1000), and \
`torch.unique` and boolean indexing synchronised too. Now 1 − β^t comes from a table of the \
same binary-exponentiation products (the same bytes as the C loop, tested), samples are grouped \
by a sort, and the only sync left is the check of the index range (`check_index`).

What would close the rest, not done: one fused GPU kernel per direction, as on the CPU (counts, \
update and the masked sums in one pass over the similarities), or letting `torch.compile` trace \
the reference on GPUs (the threshold step is an opaque custom op under compile today, so \
Inductor fuses the loss around it but not the step itself).""".split("\n\n")


LOSS_NOTES = """How the loss step runs on the CPU (`glofnd._ops`, csrc/loss.c; docs/losses.md): \
every base computes its rows in C kernels, forward and backward, for `method='none'` and \
`method='glofnd'` alike; the excluded columns (own, positive) are given by index. With GloFND, \
one kernel per block of rows (`fused_forward`) counts each data-set index's rows against the \
current λ while taking their maximum, updates λ, and sums the kept exponentials against the \
new λ from L1/L2; the backward compares each entry with its row's λ again. No R x M mask, \
validity mask or float temporary is made by either variant. What GloFND adds: the counts, the \
Adam step of the batch's samples, one comparison per entry and pass, and the Python and \
dispatch of the call (one block of rows for SimCLR and SogCLR, two for CLIP). Timed on the \
kernels alone at B = 256 (1 thread, 2026-11-27), the fused forward costs 8 µs more than the \
plain forward for SimCLR (151 against 143 µs) and 3 µs per CLIP direction (44.5 against 41.5), \
the backward with λ 6 and 1.5 µs more (a row with nothing above its λ, four in five with CLIP's \
α = 0.001, runs its backward as the plain one); the rest of the overhead above is Python, \
dispatch, and the state's cache lines.

The Python around the kernels counts for more than its microbenchmarks say: inside a training \
step its code and data are cold. An A/B of CLIP at B = 256 in alternating processes (CPU time, \
10 rounds, 2026-11-27) measured the fused forward called bare (an unsafe experiment: no lock, \
no checks, no version bump) at +1.7%, and then each guard put back: the version bump that \
tells autograd the state changed +0.7 point, the lock +0.3, the dispatch check +0.3 (the base \
loss pays for that one too). Since commit 815eb0d GloFND keeps its hyper-parameters as one \
tuple (made again when an attribute is set) and checks the NumPy views it keeps of its state \
by identity, address and version counter instead of shapes and strides: CLIP at B = 256 went \
from +3.6% to +3.0% in that A/B (8 rounds). SimCLR and SogCLR take the same path; they were \
not A/B-tested, and read +0.9% to +1.8% in this session's full runs (+1.5% to +2.8% before).

The kernels compute exp with their own vectorised polynomial (Cephes' expf, < 2 ulp) and sum in \
16 fixed lanes, so their values differ from torch's by float32 rounding (tests: rtol 1e-5 \
against float64 formulas) and are the same for every thread count and instruction set. They \
also make the base loss itself faster than torch's formula: compare the `none` column with the \
previous run below.

Before these kernels (the same section on the code of commit 4fb6fe6, 1 thread, CPU time, same \
machine, 2026-11-27 00:14 UTC): none / glofnd µs and overhead: simclr 3682 / 4228 (+14.8%) at \
B = 256 and 60233 / 61975 (+2.9%) at B = 1024; sogclr 3959 / 4314 (+9.0%) and 73314 / 78945 \
(+7.7%); clip 1481 / 1816 (+22.7%) and 25216 / 26774 (+6.2%). There the losses were torch's \
where/logsumexp over the kept mask, whose CPU kernels branch on every element of a scattered \
mask, and the threshold step wrote the mask for them.

Before the kernels ran each span's last partial block of 16 as a vector (masked loads and \
stores), reduced their lanes in a tree, and before the CLIP forward and the step lost some \
Python layers and the InfoNCE's backward stopped making zero gradients for its integer outputs \
(the full run of \
2026-11-27 04:53 UTC on commit 5be8be5, 1 thread, CPU time): none / glofnd µs and overhead: \
simclr 2828 / 2952 (+4.4%) at B = 256 and 41488 / 42371 (+2.1%) at B = 1024; sogclr 3234 / 3333 \
(+3.1%) and 42821 / 43568 (+1.7%); clip 1236 / 1380 (+11.7%) and 17101 / 17632 (+3.1%). Those \
partial blocks, two or three per row, were summed one entry at a time with a scalar exp, and \
took about a third of the kernels' time at these sizes (more in the fused forward, whose scalar \
first pass also counted).

Run-to-run spread: the large outputs of a step (the gradient of the similarities, 1-16 MiB \
here) are fresh glibc allocations, which the kernel maps with page faults when glibc has \
returned the memory of the last step to it; this adds tens of µs to either variant at random \
and moves the B = 256 overheads by about ±1 point between runs. Told to keep freed memory, \
which any CPU training loop can do, `MALLOC_MMAP_THRESHOLD_=1000000000 \
MALLOC_TRIM_THRESHOLD_=4000000000 python benchmarks/run.py --only c --threads 1 --no-write` \
gave (2026-11-27, same machine, on the code before the partial-block kernels, CPU time, none \
/ glofnd µs): simclr 2738 / 2837 (+3.6%) and \
39655 / 40469 (+2.1%), sogclr 3102 / 3183 (+2.6%) and 42805 / 43327 (+1.2%), clip 1163 / \
1273 (+9.5%) and 16602 / 17091 (+2.9%) at B = 256 and 1024.

Synthetic features: the second view is the first plus 1.5 x N(0, 1) noise (positives at cosine \
~0.55). With much closer positives (cosine ~0.9) and CLIP's logit scale 100, exp(s - max) \
underflows into float32 subnormals in torch's path and every variant's step costs ~3x as much, \
which would make the overhead ratio look smaller than it is.""".split("\n\n")


def count_ops(fn) -> int:
    """The torch operations one call of ``fn`` dispatches from Python (``torch.profiler``
    events named aten::* whose parent is not one): on a GPU each is at least one launch from the
    host, which bounds a small step's time whatever the GPU does."""
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    """Resets the peak resident set size (VmHWM) to the current one (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _profiled_peak(fn) -> int:
    """Peak of the bytes the torch CPU allocator holds during fn(), above the level at its
    start: the running sum of the profiler's allocation (+) and free (−) events."""
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def memory_probe(spec: str) -> None:
    """Child process of section e: prints JSON {method: {"rss": bytes, "torch": bytes}} for
    one (base, B, device), each the smallest over a few measured steps."""
    base, b, dev = spec.split(",")
    b = int(b)
    torch.set_num_threads(1)
    n = 100_000
    step, inputs = loss_case(base, b, n, dev)
    losses = {m: make_loss(base, m, n).to(dev) for m in ("glofnd", "none")}
    warm_lambdas(losses["glofnd"], inputs)
    for f in losses.values():
        step(f)
        step(f)
    out = {m: {"rss": [], "torch": []} for m in losses}
    cuda = dev.startswith("cuda")
    for _ in range(3):
        for m, f in losses.items():
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_bytes = torch.cuda.memory_allocated()
                step(f)
                out[m]["torch"].append(torch.cuda.max_memory_allocated() - base_bytes)
                continue
            if _reset_peak_rss():
                before = _status_kib()["VmRSS"]
                step(f)
                out[m]["rss"].append(_status_kib()["VmHWM"] - before)
            gc.collect()
            out[m]["torch"].append(_profiled_peak(lambda f=f: step(f)))
    print(json.dumps({m: {k: min(v) if v else None for k, v in d.items()}
                      for m, d in out.items()}))


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


@section("e", "Peak memory of the loss step with and without GloFND")
def section_e(cfg) -> list[str]:
    dev = cfg.device
    cuda = dev.startswith("cuda")
    sizes = loss_sizes(cfg)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072",
               OMP_NUM_THREADS="1")
    lines = [
        f"The memory one loss step (forward and backward, as in section c, on {dev}) needs "
        f"above what is held before it, for `method='glofnd'` and `method='none'`; "
        f"extra = glofnd − none. The target compares the extra with the mask itself: R x M "
        f"bytes, one bool per similarity: (2B)² for simclr/sogclr; for CLIP the two B x B masks, "
        f"one per direction, both alive in the backward.",
        "",
    ]
    if cuda:
        lines += ["Measured with `torch.cuda.max_memory_allocated()` after "
                  "`reset_peak_memory_stats()` (the caching allocator's peak of allocated "
                  "bytes), the smallest of 3 steps.", ""]
    else:
        lines += [
            "Two measures, each the smallest of 3 steps, in a child process per loss and B "
            "(one thread), both variants in the same process:",
            "",
            "- RSS: the rise of the peak resident set size over a step, i.e. VmHWM after the "
            "step (reset with `/proc/self/clear_refs` before it) − VmRSS before it. It sees "
            "every allocation, the C kernel's NumPy-allocated mask included. glibc is told to "
            "serve blocks of 64 KiB and more with mmap and to unmap them when freed "
            "(`MALLOC_MMAP_THRESHOLD_=65536`, `MALLOC_TRIM_THRESHOLD_=131072`), so that the "
            "resident size follows the live bytes (to the 4 KiB page).",
            "- torch: the peak of the running sum of the allocation and free events that "
            "`torch.profiler.profile(profile_memory=True)` records for the torch CPU allocator. "
            "Exact to the byte for torch tensors, but blind to memory allocated outside torch: "
            "what the C extension allocates through NumPy (the threshold step's mask, the "
            "fused loss's outputs and gradient), wrapped with `torch.from_numpy`, is left out.",
            "",
        ]
    rows = []
    verdicts = []
    for base in LOSSES:
        for b in sizes:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-probe",
                                   f"{base},{b},{dev}"], env=env, capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                lines.append(f"- {base}, B = {b}: the probe failed: "
                             f"{proc.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            r = m = 2 * b if base != "clip" else b
            mask = r * m * (2 if base == "clip" else 1)  # CLIP: one mask per direction
            key = "torch" if cuda else "rss"
            g, o = res["glofnd"][key], res["none"][key]
            extra = g - o if g is not None and o is not None else None
            tg, to = res["glofnd"]["torch"], res["none"]["torch"]
            rows.append([base, b, f"{r} x {m}", mib(mask),
                         "-" if o is None else mib(o), "-" if g is None else mib(g),
                         "-" if extra is None else f"{mib(extra)} ({extra / mask:.2f})",
                         "-" if cuda else f"{mib(to)} / {mib(tg)} ({(tg - to) / mask:.2f})"])
            if extra is not None:
                verdicts.append((base, b, extra, mask))
            print(f"  e: {base} B={b} done", file=sys.stderr)
    lines += table(["loss", "B", "R x M", "masks MiB", "none MiB", "glofnd MiB",
                    "extra MiB (÷ mask)",
                    "torch allocator only: none / glofnd MiB (extra ÷ mask)"],
                   rows)
    lines.append("")
    for base, b, extra, mask in verdicts:
        what = "the two masks (2 x B²)" if base == "clip" else "the mask (R x M bytes)"
        lines.append(f"- target extra memory at most {what}, {base}, B = {b}: "
                     f"{extra / mask:.2f} x ({mib(extra)} MiB), "
                     f"{'met' if extra <= mask else 'missed'}")
    lines += ["", CUDA_MEMORY_NOTES if cuda else MEMORY_NOTES]
    return lines


CUDA_MEMORY_NOTES = """What the extra is on a GPU: the reference path's threshold step \
returns the R x M bool mask, which the loss's torch formulas keep for the backward, so the extra \
is the mask, plus a few (R,) vectors of counts and thresholds (0.03 MiB at B = 4096: the \
"missed" by 1.00x above). No R x M float temporary is added."""


MEMORY_NOTES = """What the extra is: on the CPU GloFND makes no R x M array at all: the fused \
kernel writes the batch's state entries and (R,) vectors, and the backward compares each \
similarity with its row's λ again instead of keeping a mask. The extra is then within the \
granularity of the heap (allocations under 64 KiB come from glibc's heap, which grows and \
shrinks in steps of 128 KiB and more) and may come out negative. Before the fused kernels \
(commit 4fb6fe6): extra = 0.89-1.00x the mask for simclr and sogclr, 0.99-1.03x the two masks \
for CLIP: the mask the threshold step returned, kept by `torch.where` for the backward."""


# ----------------------------------------------------------------------------------- output

def machine_info(device: str = "cpu") -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor() or "unknown"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    kernel = "C extension, row kernels " + _C.isa() + (", OpenMP" if _C.openmp else "") \
        if _C is not None else "reference only (no C extension)"
    omp = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                     "OMP_DYNAMIC", "GOMP_SPINCOUNT")
                    if k in os.environ) or "none set"
    lines = [
        f"- CPU: {model}; {os.cpu_count()} cores ({usable} usable); load average at start: {load}; "
        f"OpenMP environment: {omp}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, glofnd {glofnd.__version__} ({kernel})",
    ]
    if device != "cpu":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"{props.multi_processor_count} SMs; CUDA {torch.version.cuda}; the losses "
                     f"run glofnd's pure-torch reference path there")
    return lines


HEADER = """# Benchmarks

Produced by `benchmarks/run.py` (see its docstring for the method); each section below says the
command, the machine and the date of its run. Figures are medians over repeats of interleaved
variants, with the 25th-75th percentile range; ratios compare medians of the same run. Timings
on a shared machine are noisy: other work on the same cores changes them from run to run (the
load average is recorded), so compare the ratios within a table rather than figures across
sections or runs, and re-run to see the spread.

Two threads on a busy machine: OpenMP threads wait for work by spinning first (the default
wait policy), and a parallel region ends only when every thread of the team has arrived. When
other processes occupy the cores, a call that asks for 2 threads can wait for a time slice of
the scheduler (milliseconds) instead of microseconds; `OMP_WAIT_POLICY=passive` or
`OMP_DYNAMIC=true` avoid most of it. The OpenMP environment of each run is recorded below.

Sections c and e (the losses) run on a GPU too, as sections c (cuda) and e (cuda): `python
benchmarks/run.py --only c,e --device cuda`, or `bash benchmarks/cuda_check.sh`, which also runs
the CUDA tests (timings synchronise after each step and are wall clock; memory is the caching
allocator's peak, `torch.cuda.max_memory_allocated`). Each says its card.
"""


DEVICE_SECTIONS = ("c", "e")  # the sections that run on --device; the others are CPU-only


def render(key: str, title: str, body: list[str], cfg, started: str, elapsed: float) -> str:
    heading = key if "-" not in key else "{} ({})".format(*key.split("-", 1))
    lines = [f"<!-- section {key} -->", f"## {heading}. {title}", "",
             f"- Command: `{cfg.command}`{' (quick)' if cfg.quick else ''}; {started} UTC, "
             f"{elapsed:.0f} s"] + cfg.machine + [""] + body + ["", f"<!-- end {key} -->"]
    return "\n".join(lines)


def write_doc(path: str, blocks: dict[str, str]) -> None:
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        for m in re.finditer(r"<!-- section ([\w-]+) -->.*?<!-- end \1 -->", text, re.S):
            old[m.group(1)] = m.group(0)
    old.update(blocks)
    # each section, then its runs on other devices ("c-cuda" after "c"), then unknown ones
    keys = [k for s in SECTIONS for k in sorted(old) if k == s or k.startswith(s + "-")]
    keys += sorted(k for k in old if k not in keys)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(HEADER + "\n" + "\n\n".join(old[k] for k in keys) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma list of sections (default: all): "
                   + ", ".join(SECTIONS))
    p.add_argument("--quick", action="store_true",
                   help="B in {128, 512}, fewer repeats, no torch.compile; not written to the "
                        "docs unless --out is given")
    p.add_argument("--out", help=f"Markdown file to update (default {os.path.relpath(DOC, ROOT)})")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--device", default="cpu",
                   help="device of the loss sections c and e (default cpu; e.g. cuda). The "
                        "threshold-step sections a, b, d always run on the CPU")
    p.add_argument("--threads", default="1,2",
                   help="comma list of thread counts for the CPU timings (default 1,2)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_probe:
        memory_probe(args.memory_probe)
        return
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"--device {args.device}: only cpu and an available cuda device are supported")
    keys = list(SECTIONS) if not args.only else [k.strip() for k in args.only.split(",")]
    unknown = [k for k in keys if k not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")

    cfg = argparse.Namespace(
        quick=args.quick,
        sizes=[128, 512] if args.quick else [128, 512, 2048],
        threads=[int(t) for t in args.threads.split(",")],
        repeats=5 if args.quick else 15,
        min_time=0.004 if args.quick else 0.02,
        compile=not args.quick,
        device=args.device,
        command="python benchmarks/run.py" + ("" if not argv and len(sys.argv) < 2
                                              else " " + " ".join(argv or sys.argv[1:])),
        machine=machine_info(args.device),
    )
    torch.manual_seed(0)
    prev_threads = torch.get_num_threads()
    blocks = {}
    for key in keys:
        title, fn = SECTIONS[key]
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        print(f"section {key}: {title}", file=sys.stderr)
        t0 = time.perf_counter()
        body = fn(cfg)
        torch.set_num_threads(prev_threads)
        tag = key if args.device == "cpu" or key not in DEVICE_SECTIONS \
            else f"{key}-{args.device.split(':')[0]}"
        blocks[tag] = render(tag, title, body, cfg, started, time.perf_counter() - t0)
        print(blocks[tag] + "\n")
    out = args.out or (None if args.quick else DOC)
    if out and not args.no_write:
        write_doc(out, blocks)
        print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
