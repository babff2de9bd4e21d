#!/usr/bin/env python
"""Benchmarks of glofnd: one entry point that prints Markdown tables and writes docs/benchmarks.md.

    python benchmarks/run.py                 # every section (~3 min on 2 cores)
    python benchmarks/run.py --quick         # fewer sizes and repeats, no torch.compile (~20 s)
    python benchmarks/run.py --only a,d      # some sections; the others in the file are kept

Method: the variants of one table run interleaved, one after another inside each repeat (the
order rotates between repeats), so that a change of machine load affects all of them alike;
each figure is the median over repeats of the mean time per call over a short inner loop, with
the 25th-75th percentile range beside it; every ratio compares medians of the same run.

Sections live in a registry (``SECTIONS``, filled by ``@section``); a new one is a function
returning Markdown lines. Present: a (threshold step against eager PyTorch), b (against the
time to read the similarity matrix once), d (against the data-set size N). Planned: c and e,
which need the losses.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
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
from glofnd import _ops, numpy_api, reference  # noqa: E402
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


def stalled(rows: list[list], key: Callable[[list], object], col: int, row: list) -> str:
    """STALL when row (threads > 1) took over 5x its 1-thread twin (same key), else ""."""
    if row[1] == 1:
        return ""
    twin = [r for r in rows if r[1] == 1 and key(r) == key(row)]
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
    """A NumPy state whose pages are all written (np.zeros pages would fault on first use)."""
    st = numpy_api.init_state(n)
    for k in ("exp_avg", "exp_avg_sq", "steps"):
        st[k][:] = 0
    return st


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
        f"baseline, and glofnd's pure-torch reference path (`_ops._backend = "reference"`). Each variant "
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
    return lines


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
        f"ratio = median / median at N = 10^3.",
        "",
    ]
    if _C is None:
        return lines + ["The C extension is not built: nothing to measure."]
    rng = np.random.default_rng(0)
    sim = (torch.rand(2 * b, 2 * b, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    a = sim.numpy()
    draws = {n: [np.concatenate([i, i]) for i in (rng.choice(n, b, replace=False)
                                                  for _ in range(pool))] for n in ns}
    states = {n: touched_state(n) for n in ns}
    rows = []
    for threads in cfg.threads:
        variants = {}
        for n in ns:
            st, ixs, k = states[n], draws[n], [0]

            def call(st=st, ixs=ixs, k=k, threads=threads):
                k[0] = (k[0] + 1) % len(ixs)
                return _C.step(a, ixs[k[0]], None, st["lambdas"], st["exp_avg"],
                               st["exp_avg_sq"], st["steps"], num_threads=threads)
            variants[n] = call
        res = measure(variants, cfg.repeats, cfg.min_time)
        base, cbase = med(res[ns[0]][0]), med(res[ns[0]][1])
        for n in ns:
            wall, cpu = res[n]
            rows.append([f"10^{int(round(np.log10(n)))}", threads, us(med(wall)), spread(wall),
                         f"{med(wall) / base:.2f}",
                         f"{us(med(cpu))} ({med(cpu) / cbase:.2f})" if threads == 1 else "-"])
        print(f"  d: threads={threads} done", file=sys.stderr)
    lines += table(["N", "threads", "_C.step median µs", "p25-p75 µs", "ratio to N = 10^3",
                    "CPU µs, 1 thread (ratio)"], rows)
    lines.append("")
    for r in rows:
        if r[0] == "10^7":
            x = float(r[4])
            lines.append(f"- target N = 10^7 within 10% of N = 10^3, {r[1]} thread(s): "
                         f"{x:.2f} (wall clock), {'met' if x <= 1.10 else 'missed'}"
                         + stalled(rows, lambda q: q[0], 2, r))
            if r[1] == 1:
                xc = float(r[5].split("(")[1].rstrip(")"))
                lines.append(f"- the same in CPU time, 1 thread: {xc:.2f}, "
                             f"{'met' if xc <= 1.10 else 'missed'}")
    lines += ["", "Where N = 10^7 costs more: each sample's update reads and writes one cache line "
              "in each of the four state arrays (λ, m, v, t), at random over 160 MB; they are "
              "prefetched four groups ahead, which hides the latency but not the memory traffic "
              "of 4 random lines per sample. Huge pages for the state did not change it here."]
    return lines


# ----------------------------------------------------------------------------------- output

def machine_info() -> list[str]:
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
    return [
        f"- CPU: {model}; {os.cpu_count()} cores ({usable} usable); load average at start: {load}; "
        f"OpenMP environment: {omp}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, glofnd {glofnd.__version__} ({kernel})",
    ]


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

Sections c and e (the losses) are not measured yet.
"""


def render(key: str, title: str, body: list[str], cfg, started: str, elapsed: float) -> str:
    lines = [f"<!-- section {key} -->", f"## {key}. {title}", "",
             f"- Command: `{cfg.command}`{' (quick)' if cfg.quick else ''}; {started} UTC, "
             f"{elapsed:.0f} s"] + cfg.machine + [""] + body + ["", f"<!-- end {key} -->"]
    return "\n".join(lines)


def write_doc(path: str, blocks: dict[str, str]) -> None:
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        for m in re.finditer(r"<!-- section (\w+) -->.*?<!-- end \1 -->", text, re.S):
            old[m.group(1)] = m.group(0)
    old.update(blocks)
    keys = [k for k in SECTIONS if k in old] + sorted(k for k in old if k not in SECTIONS)
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
    args = p.parse_args(argv)
    keys = list(SECTIONS) if not args.only else [k.strip() for k in args.only.split(",")]
    unknown = [k for k in keys if k not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")

    cfg = argparse.Namespace(
        quick=args.quick,
        sizes=[128, 512] if args.quick else [128, 512, 2048],
        threads=[1, 2],
        repeats=5 if args.quick else 15,
        min_time=0.004 if args.quick else 0.02,
        compile=not args.quick,
        command="python benchmarks/run.py" + ("" if not argv and len(sys.argv) < 2
                                              else " " + " ".join(argv or sys.argv[1:])),
        machine=machine_info(),
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
        blocks[key] = render(key, title, body, cfg, started, time.perf_counter() - t0)
        print(blocks[key] + "\n")
    out = args.out or (None if args.quick else DOC)
    if out and not args.no_write:
        write_doc(out, blocks)
        print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
