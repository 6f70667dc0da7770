"""Runs the registered families: every case x provider x mode on a device, then prints a table, appends
the rows to benchmarks/results/<device-slug>/<op>.csv and draws <op>.png beside it."""
from __future__ import annotations

import csv
import importlib
import math
import os
import pkgutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import timing
from .core import Op, Skip

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Modules of this package that are not operator families.
_INFRA = {"core", "timing", "runner", "plot", "conftest"}

CSV_COLUMNS = [
    "date", "device", "device_name", "num_threads", "torch", "triton", "python", "git_sha",
    "op", "case", "provider", "kind", "mode", "timing", "dtype", "params",
    "median_ms", "p20_ms", "p80_ms", "bytes", "gbps", "copy_gbps", "frac_copy_bw", "tflops",
    "peak_mem_mib", "speedup_vs_best_other", "speedup_vs_ref", "ratio_to_yardstick", "check_err", "status", "seed",
    "quick",
]


def discover() -> dict:
    """Every family module of this package (a module with a module-level `OP`), by op name."""
    pkg = importlib.import_module(__package__)
    ops = {}
    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if m.name in _INFRA or m.name.startswith(("_", "test_")):
            continue
        try:
            mod = importlib.import_module(f"{__package__}.{m.name}")
        except Exception as e:  # noqa: BLE001  (one broken family must not hide the others)
            print(f"benchmarks: cannot import benchmarks.{m.name}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        op = getattr(mod, "OP", None)
        if isinstance(op, Op):
            ops[op.name] = op
    return ops


class Progress:
    """A small progress bar on stderr: redrawn in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.tty = timing.stderr_isatty()
        self.t0 = time.perf_counter()

    def step(self, label: str, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            line = f"\r[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
            sys.stderr.write(line[:160].ljust(160))
        else:
            sys.stderr.write(f"[{self.done:>4}/{self.total}] {elapsed:6.1f}s {label}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * 160 + "\r")
            sys.stderr.flush()


@dataclass
class Selection:
    ops: Optional[list] = None        # op names; None = all
    modes: tuple = ("fwd", "bwd", "fwd_bwd")
    quick: bool = False
    cases: Optional[list] = None      # substrings a case name must contain (any)
    providers: Optional[list] = None  # provider names (exact) or substrings
    seed: int = 0
    check: bool = True


@dataclass
class Report:
    rows: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)   # (op, provider) -> reason
    failures: list = field(default_factory=list)  # rows of kind "kxops" that errored or mismatched


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


def _match(name: str, wanted: Optional[list], names=()) -> bool:
    """A filter word selects the name it equals, else (when it equals none of `names`) every name that
    contains it: "kxops-cpu" is that provider alone, "kxops" every kxops provider."""
    return not wanted or any(w == name or (w not in names and w in name) for w in wanted)


def select_cases(op: Op, device: str, sel: Selection) -> list:
    cases = [c for c in op.cases(device) if c.device == device]
    if sel.quick:
        cases = [c for c in cases if c.quick] or cases[:1]
    names = {c.name for c in cases}
    return [c for c in cases if _match(c.name, sel.cases, names)]


def select_providers(op: Op, device: str, sel: Selection, report: Report) -> list:
    usable = []
    for p in op.providers:
        if device not in p.devices or not _match(p.name, sel.providers, {q.name for q in op.providers}):
            continue
        try:
            reason = p.available()
        except Exception as e:  # noqa: BLE001
            reason = _short(e)
        if reason:
            report.skipped[(op.name, p.name)] = reason
        else:
            usable.append(p)
    return usable


def modes_for(op: Op, case, provider, sel: Selection) -> list:
    return [m for m in op.modes_for(case, provider) if m in sel.modes]


def plan_size(op: Op, device: str, sel: Selection) -> int:
    """The progress bar's total: the rows a run of op on device produces, counting those of a provider
    whose setup then declines a case (returns None)."""
    providers = select_providers(op, device, sel, Report())
    return sum(len(modes_for(op, c, p, sel)) for c in select_cases(op, device, sel) for p in providers)


def _usable(p, device) -> bool:
    """The reference checks the others even when --provider leaves it out of the timing."""
    if p is None or device not in p.devices:
        return False
    try:
        return not p.available()
    except Exception:  # noqa: BLE001
        return False


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(o) for o in out)
    if isinstance(out, dict):
        return {k: _detach(v) for k, v in out.items()}
    return out


def provider_params(op: Op, compile_cases: set, compile_modes: Optional[tuple] = None) -> list:
    """pytest parameters (case, provider, mode) of a family's pytest-benchmark suite: its small cases on
    every device here, each provider that runs on that device; torch.compile providers only on
    `compile_cases` (seconds per graph on a small CPU) and, when given, only in `compile_modes`."""
    import pytest

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = []
    for device in devices:
        for case in op.small_cases(device):
            for p in op.providers:
                if device not in p.devices or (p.kind == "compile" and case.name not in compile_cases):
                    continue
                for mode in op.modes_for(case, p):
                    if p.kind != "compile" or compile_modes is None or mode in compile_modes:
                        params.append(pytest.param(case, p, mode, id=f"{device}-{case.name}-{p.name}-{mode}"))
    return params


def provider_test(op: Op, benchmark, case, provider, mode: str) -> None:
    """The pytest-benchmark suite's test of one (case, provider, mode) (benchmarks/test_bench_<family>.py):
    skipped where the provider or the reference cannot run here, the output checked against the reference
    (op.expected where set), then a few timed rounds."""
    import pytest

    why = provider.available() or (op.reference.available() and f"reference: {op.reference.available()}")
    if why:
        pytest.skip(f"{provider.name}: {why}")
    if op.expected is not None:
        want = op.expected(case, op.make_inputs(case, 0))
    else:
        want = op.reference.setup(case, op.make_inputs(case, 0))()
    inputs = op.make_inputs(case, 0)
    try:
        fn = provider.setup(case, inputs)
    except Skip as e:
        pytest.skip(f"{provider.name}: n/a: {e}")
    if fn is None:
        pytest.skip(f"{provider.name} cannot express {case.name}")
    out = fn()
    if provider.kind != "yardstick":
        err = (provider.check or op.check)(want, out, case)
        assert err <= op.tolerance(case.dtype), f"{provider.name} differs from the reference: rel RMS {err:.2e}"

    step = timing.make_step(fn, inputs, mode, op.outputs, 0)
    benchmark.group = f"{op.name} {case.name} {mode}"
    benchmark.extra_info.update(bytes=op.bytes_moved(case, mode), provider=provider.name, mode=mode)
    if case.device == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


def run_op(op: Op, device: str, sel: Selection, budget: timing.Budget, env: dict, copy_gbps: float,
           progress: Progress, report: Report) -> list:
    cases = select_cases(op, device, sel)
    providers = select_providers(op, device, sel, report)
    ref_provider = op.reference
    rows = []
    for case in cases:
        ref_out = None
        if sel.check and op.check is not None and _usable(ref_provider, device):
            try:
                if op.expected is not None:
                    ref_out = _detach(op.expected(case, op.make_inputs(case, sel.seed)))
                else:
                    fn = ref_provider.setup(case, op.make_inputs(case, sel.seed))
                    ref_out = _detach(fn()) if fn is not None else None
                    del fn
            except Skip as e:
                print(f"benchmarks: {op.name} {case.name}: unchecked (reference n/a: {e})", file=sys.stderr)
            except Exception as e:  # noqa: BLE001  (its own rows will carry the error)
                print(f"benchmarks: {op.name} {case.name}: reference failed: {_short(e)}", file=sys.stderr)
        case_rows = []
        for p in providers:
            modes = modes_for(op, case, p, sel)
            if not modes:
                continue
            how = p.timing or case.timing
            base = dict(env, op=op.name, case=case.name, provider=p.name, kind=p.kind, timing=how,
                        dtype=case.dtype_name, params=_params(case), seed=sel.seed, quick=int(sel.quick),
                        copy_gbps=copy_gbps)
            progress.step(f"{op.name} {case.name} {p.name} setup", 0)
            try:
                inputs = op.make_inputs(case, sel.seed)
                fn = p.setup(case, inputs)
            except Skip as e:  # it could express the case but cannot run it here: a row that says why
                case_rows += [dict(base, mode=m, status=f"n/a: {e}") for m in modes]
                progress.step(f"{op.name} {case.name} {p.name} (n/a)", len(modes))
                inputs = None
                timing.release(device)
                continue
            except Exception as e:  # noqa: BLE001
                case_rows += [dict(base, mode=m, status="error: " + _short(e)) for m in modes]
                progress.step(f"{op.name} {case.name} {p.name} (setup error)", len(modes))
                continue
            if fn is None:  # the provider cannot express this case
                progress.step(f"{op.name} {case.name} {p.name} (n/a)", len(modes))
                continue
            status, err = "ok", None
            # The first call warms up (compiles) and gives the output checked against the reference: before
            # any other call, so that an in-place provider is checked on inputs it has rotated once.
            try:
                out = fn()
                timing.synchronize(device)
                if ref_out is not None and p.kind != "yardstick":
                    err = (p.check or op.check)(ref_out, out, case)
                    if err is not None and not err <= op.tolerance(case.dtype):
                        status = "MISMATCH"
                del out
            except Exception as e:  # noqa: BLE001
                case_rows += [dict(base, mode=m, status="error: " + _short(e)) for m in modes]
                progress.step(f"{op.name} {case.name} {p.name} (error)", len(modes))
                if os.environ.get("KXOPS_BENCH_TRACEBACK"):
                    traceback.print_exc()
                del fn, inputs
                timing.release(device)
                continue
            for mode in modes:
                progress.step(f"{op.name} {case.name} {p.name} {mode}")
                row = dict(base, mode=mode, check_err=err, status=status)
                step = None
                try:
                    step = timing.make_step(fn, inputs, mode, op.outputs, sel.seed)
                    t = timing.time_fn(step, device, budget, how)
                    nbytes = op.bytes_moved(case, mode)
                    gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, bytes=nbytes, gbps=gbps,
                               frac_copy_bw=gbps / copy_gbps if copy_gbps else None)
                    if op.flops is not None and p.kind != "yardstick":  # its work is not the case's
                        fl = op.flops(case, mode)
                        row["tflops"] = fl / (t.median_ms * 1e-3) / 1e12 if fl else None
                    if op.record_memory:
                        row["peak_mem_mib"] = timing.peak_memory_mib(step, device)
                except Exception as e:  # noqa: BLE001
                    row["status"] = "error: " + _short(e)
                    if os.environ.get("KXOPS_BENCH_TRACEBACK"):
                        traceback.print_exc()
                del step
                case_rows.append(row)
            del fn, inputs
            timing.release(device)
        _speedups(case_rows)
        rows += case_rows
        del ref_out
        timing.release(device)
    for r in rows:
        if r["kind"] == "kxops" and r["status"] != "ok" and not r["status"].startswith("n/a"):
            report.failures.append(r)
    return rows


def _params(case) -> str:
    return " ".join(f"{k}={v}" for k, v in case.params.items() if not isinstance(v, (list, tuple)) or len(v) <= 16)


def _speedups(rows: list) -> None:
    """speedup_vs_best_other: the fastest OTHER provider's median / this median (> 1: this one wins);
    speedup_vs_ref: the reference's median / this median; ratio_to_yardstick: this median / the
    yardstick's. Only rows that ran and passed the check count, compared within one mode and one timing
    (a host-timed eager call and a graph replay timed by CUDA events do not measure the same thing);
    the yardstick is nobody's competitor."""
    groups = {}
    for r in rows:
        if r.get("median_ms") and r["status"] == "ok":
            groups.setdefault((r["mode"], r.get("timing", "device")), []).append(r)
    for group in groups.values():
        ref = next((r["median_ms"] for r in group if r["kind"] == "reference"), None)
        yard = next((r["median_ms"] for r in group if r["kind"] == "yardstick"), None)
        contenders = [r for r in group if r["kind"] != "yardstick"]
        for r in contenders:
            others = [o["median_ms"] for o in contenders if o is not r]
            r["speedup_vs_best_other"] = min(others) / r["median_ms"] if others else None
            r["speedup_vs_ref"] = ref / r["median_ms"] if ref else None
            r["ratio_to_yardstick"] = r["median_ms"] / yard if yard else None


# ----------------------------------------------------------------------------------------------
# Output: table, CSV, plot.

def _f(v, fmt: str, none: str = "-") -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, fmt)


def format_table(op: Op, device: str, rows: list, env: dict, copy_gbps: float) -> str:
    show_tf = op.flops is not None
    show_mem = op.record_memory and any(r.get("peak_mem_mib") is not None for r in rows)
    show_timing = len({r.get("timing") for r in rows}) > 1
    yardstick = _yardstick(op)
    yw = max(12, len(yardstick) + 4)
    show_yard = any(r.get("ratio_to_yardstick") for r in rows)
    pw = max([18] + [len(r["provider"]) + 2 for r in rows])
    lines = [f"== {op.name} on {device}: {env['device_name']} | copy bandwidth {copy_gbps:.1f} GB/s (read+write) "
             f"| torch {env['torch']} triton {env['triton'] or '-'} | git {env['git_sha']}"]
    head = f"  {'mode':<8}{'provider':<{pw}}" + (f"{'timing':<8}" if show_timing else "")
    head += f"{'median ms':>11}{'p20-p80 ms':>19}{'GB/s':>9}{'%copy':>7}"
    if show_tf:
        head += f"{'TFLOP/s':>9}"
    if show_mem:
        head += f"{'peak MiB':>10}"
    head += f"{'vs best other':>15}{'vs ref':>8}"
    if show_yard:
        head += f"{'x ' + yardstick:>{yw}}"
    head += "  check"
    cases = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    for c in cases:
        crow = [r for r in rows if r["case"] == c]
        lines.append(f"{c} ({crow[0]['dtype']})")
        lines.append(head)
        for mode in op.modes:
            mrows = [r for r in crow if r["mode"] == mode]
            best = {}
            for r in mrows:
                if r.get("median_ms") and r["status"] == "ok" and r["kind"] != "yardstick":
                    t = r.get("timing")
                    best[t] = min(best.get(t, r["median_ms"]), r["median_ms"])
            for r in mrows:
                line = f"  {mode:<8}{r['provider']:<{pw}}" + (f"{r.get('timing') or '':<8}" if show_timing else "")
                if not r.get("median_ms"):
                    lines.append(f"{line}  {r['status']}")
                    continue
                star = "*" if r["median_ms"] == best.get(r.get("timing")) else " "
                q = f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"
                pct = _f(r.get('frac_copy_bw') and 100 * r['frac_copy_bw'], '.0f')
                line += f"{r['median_ms']:>10.4g}{star}{q:>19}{_f(r.get('gbps'), '.1f'):>9}{pct:>6}%"
                if show_tf:
                    line += f"{_f(r.get('tflops'), '.2f'):>9}"
                if show_mem:
                    line += f"{_f(r.get('peak_mem_mib'), '.0f'):>10}"
                line += f"{_x(r.get('speedup_vs_best_other')):>15}{_x(r.get('speedup_vs_ref')):>8}"
                if show_yard:
                    line += f"{_x(r.get('ratio_to_yardstick')):>{yw}}"
                err = r.get("check_err")
                line += "  " + (("ok " if r["status"] == "ok" else r["status"] + " ") + _f(err, ".1e")
                                if err is not None else r["status"] if r["status"] != "ok" else "-")
                lines.append(line)
    return "\n".join(lines)


def _yardstick(op: Op) -> str:
    return next((p.name for p in op.providers if p.kind == "yardstick"), "yardstick")


def _x(v) -> str:
    return _f(v, ".2f") + ("x" if v else "")


def _us(ms) -> str:
    return _f(ms and 1e3 * ms, ".1f") + " us"


def format_targets(op: Op, rows: list) -> list:
    """One line per goal of each Target and mode (and timing) it covers: the measured value, then met /
    MISSED / n/a (n/a: the row, or the row it is compared with, did not run or failed its check). A
    Target's provider, or an entry of its faster_than, that names several providers stands for the
    fastest of them in that case, mode and timing."""
    lines = []
    for t in op.targets:
        mine = [r for r in rows if r["case"] == t.case and r["provider"] in _names(t.provider) and r["mode"] in t.modes]
        for mode, how in dict.fromkeys((r["mode"], r.get("timing")) for r in mine):
            r = _fastest([o for o in mine if o["mode"] == mode and o.get("timing") == how])
            ok = _ran(r)
            who = _label(t.provider, r if ok else None)
            where = f"on {t.case} {mode}"
            if t.min_speedup is not None:
                s = r.get("speedup_vs_ref") if ok else None
                lines.append(_goal(f"{who} >= {t.min_speedup:g}x reference {where}", _x(s), s and s >= t.min_speedup))
            if t.max_us is not None:
                ms = r["median_ms"] if ok else None
                lines.append(_goal(f"{who} <= {t.max_us:g} us {where}", _us(ms), ms and 1e3 * ms <= t.max_us))
            for other in t.faster_than:
                o = _fastest([o for o in rows if o["case"] == t.case and o["provider"] in _names(other)
                              and o["mode"] == mode and o.get("timing") == how])
                oms = o["median_ms"] if _ran(o) else None
                ms = r["median_ms"] if ok and oms else None
                what, value = f"faster than {_label(other, o if oms else None)}", f"{_us(ms)} vs {_us(oms)}"
                met = ms and ms < oms
                if t.faster_by > 1:
                    what, value = f">= {t.faster_by:g}x faster than {_label(other, o if oms else None)}", \
                        f"{value} ({_x(ms and oms / ms)})"
                    met = ms and oms / ms >= t.faster_by
                lines.append(_goal(f"{who} {what} {where}", value, met))
            if t.max_ratio is not None:
                x = r.get("ratio_to_yardstick") if ok else None
                lines.append(_goal(f"{who} <= {t.max_ratio:g}x {_yardstick(op)} {where}", _x(x),
                                   x and x <= t.max_ratio))
            if t.max_mem_mib is not None:
                mib = r.get("peak_mem_mib") if ok else None
                lines.append(_goal(f"{who} peak memory <= {t.max_mem_mib:.0f} MiB {where}", f"{_f(mib, '.0f')} MiB",
                                   None if mib is None else mib <= t.max_mem_mib))
            if t.min_frac_copy is not None:
                frac = r.get("frac_copy_bw") if ok else None
                met = None if frac is None else frac >= t.min_frac_copy
                lines.append(_goal(f"{who} >= {100 * t.min_frac_copy:g}% of copy bandwidth {where}",
                                   f"{_f(frac and 100 * frac, '.0f')}%", met))
    return lines


def _names(provider) -> tuple:
    return (provider,) if isinstance(provider, str) else tuple(provider)


def _label(provider, row) -> str:
    """A goal's provider as printed: its name, or for a group the one that was fastest (or the group)."""
    if isinstance(provider, str):
        return provider
    group = "/".join(provider)
    return f"{row['provider']} (fastest of {group})" if row else f"fastest of {group}"


def _ran(r) -> bool:
    return r is not None and r["status"] == "ok" and bool(r.get("median_ms"))


def _fastest(rows: list):
    """The fastest row that ran and passed its check, else the first row (None for none)."""
    ran = [r for r in rows if _ran(r)]
    return min(ran, key=lambda r: r["median_ms"]) if ran else (rows[0] if rows else None)


def _goal(what: str, value: str, met) -> str:
    verdict = "n/a" if met is None else ("met" if met else "MISSED")
    return f"  target {what}: {value} {verdict}"


def write_csv(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != CSV_COLUMNS:  # columns changed: keep the old file aside rather than mix layouts
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
            os.replace(path, path[:-4] + f".{stamp}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6g}"
    return v


def plot(path: str, op_name: str, rows: list, title: str, copy_gbps: Optional[float]) -> Optional[str]:
    """Grouped horizontal bars of GB/s per case and provider, one panel per mode, the copy bandwidth as a
    dashed line; TFLOP/s instead for a family that counts FLOPs (matrix-bound: its GB/s says little).
    Host-timed rows are left out: the GB/s of a host-bound call says nothing of bandwidth.
    Returns None on success, else why no plot was drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"matplotlib not importable ({_short(e)}): no plot"
    key = "tflops" if any(r.get("tflops") for r in rows) else "gbps"
    if key == "tflops":
        copy_gbps = None
    ok = [r for r in rows if r.get(key) and r.get("timing", "device") == "device"]
    if not ok:
        return "no device-timed rows: no plot"
    modes = [m for m in ("fwd", "bwd", "fwd_bwd") if any(r["mode"] == m for r in ok)]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    h = 0.8 / len(providers)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 1.0 + 0.35 * len(cases) * len(providers)),
                             sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, mode in zip(axes[0], modes):
        for j, p in enumerate(providers):
            ys, xs = [], []
            for i, c in enumerate(cases):
                r = next((r for r in ok if r["case"] == c and r["provider"] == p and r["mode"] == mode), None)
                if r is not None:
                    ys.append(i + (j - (len(providers) - 1) / 2) * h)
                    xs.append(float(r[key]))
            ax.barh(ys, xs, height=h, color=cmap(j % 10))
        if copy_gbps:
            ax.axvline(float(copy_gbps), color="k", ls="--", lw=1)
        ax.set_title(mode)
        ax.set_xlabel("TFLOP/s (useful FLOPs / median time)" if key == "tflops"
                      else "GB/s (bytes that must move / median time)")
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels(cases, fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    # drawn from proxies: a provider absent from the last panel would otherwise get no (or a wrong) entry
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Patch(color=cmap(j % 10), label=p) for j, p in enumerate(providers)]
    if copy_gbps:
        handles.append(Line2D([], [], color="k", ls="--", lw=1, label="copy bandwidth"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
