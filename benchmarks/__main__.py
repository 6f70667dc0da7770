"""python -m benchmarks [--op rope] [--device cpu|cuda|all] [--mode fwd|bwd|fwd_bwd] [--quick] ...

Runs every registered family's cases on the device (CUDA when a GPU is visible, else CPU), prints a
table per family, appends the rows to benchmarks/results/<device-slug>/<op>.csv and draws <op>.png.
Exits 1 when a kxops provider errored or failed its check against the reference."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import runner, timing
from .core import MODES


def _csv_list(values):
    out = []
    for v in values or []:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out or None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", action="append", help="family to run (repeat or comma-separate); default: all")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "all"],
                    help="auto: cuda when a GPU is visible, else cpu; all: every available device")
    ap.add_argument("--mode", action="append", help=f"one or more of {', '.join(MODES)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="the quick cases only, with shorter measurements")
    ap.add_argument("--case", action="append", help="run cases whose name contains this (repeatable)")
    ap.add_argument("--provider", action="append", help="run these providers only (name or substring)")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed of the inputs (default 0)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    ap.add_argument("--no-check", action="store_true", help="skip the output check against the reference")
    ap.add_argument("--no-save", action="store_true", help="print only: no CSV, no plot")
    ap.add_argument("--no-plot", action="store_true", help="no PNG")
    ap.add_argument("--results-dir", default=runner.RESULTS_DIR, help="default: benchmarks/results")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--list", action="store_true", help="list families, cases and providers, run nothing")
    args = ap.parse_args(argv)
    args.op, args.case, args.provider = _csv_list(args.op), _csv_list(args.case), _csv_list(args.provider)
    args.mode = _csv_list(args.mode) or list(MODES)
    bad = [m for m in args.mode if m not in MODES]
    if bad:
        ap.error(f"--mode must be among {', '.join(MODES)}, got {', '.join(bad)}")
    return args


def devices_for(choice: str) -> list:
    gpu = torch.cuda.is_available()
    if choice == "auto":
        return ["cuda" if gpu else "cpu"]
    if choice == "all":
        return ["cpu", "cuda"] if gpu else ["cpu"]
    if choice == "cuda" and not gpu:
        raise SystemExit("benchmarks: --device cuda but no CUDA device is visible")
    return [choice]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = runner.discover()
    if args.op:
        unknown = [o for o in args.op if o not in ops]
        if unknown:
            print(f"benchmarks: unknown --op {', '.join(unknown)}; known: {', '.join(sorted(ops)) or 'none'}",
                  file=sys.stderr)
            return 2
        ops = {k: v for k, v in ops.items() if k in args.op}
    devices = devices_for(args.device)
    sel = runner.Selection(ops=list(ops), modes=tuple(args.mode), quick=args.quick, cases=args.case,
                           providers=args.provider, seed=args.seed, check=not args.no_check)

    if args.list:
        for op in ops.values():
            print(f"{op.name}: {op.description}")
            for d in devices:
                rep = runner.Report()
                prov = runner.select_providers(op, d, sel, rep)
                for p in prov:
                    print(f"  [{d}] provider {p.name} ({p.kind}){': ' + p.note if p.note else ''}")
                for (_, name), why in rep.skipped.items():
                    print(f"  [{d}] unavailable: {name} ({why})")
                for c in runner.select_cases(op, d, sel):
                    extra = ["quick"] if c.quick else []
                    extra += [f"modes {','.join(c.modes)}"] if c.modes else []
                    extra += [f"{c.timing} timing"] if c.timing != "device" else []
                    print(f"  [{d}] case {c.name} {c.dtype_name}{' (' + ', '.join(extra) + ')' if extra else ''}")
        return 0

    budget = timing.Budget.quick() if args.quick else timing.Budget()
    report = runner.Report()
    plan = []
    for d in devices:
        for op in ops.values():
            plan.append((d, op, runner.plan_size(op, d, sel)))
    progress = runner.Progress(sum(n for _, _, n in plan) + len(devices), enabled=not args.no_progress)

    tables = []
    for d in devices:
        env = timing.environment(d)
        progress.step(f"copy bandwidth on {d}", 0)
        copy_gbps = timing.copy_bandwidth_gbps(d, budget)
        progress.step(f"copy bandwidth on {d}: {copy_gbps:.1f} GB/s")
        slug = timing.device_slug(d)
        for dev, op, n in plan:
            if dev != d or n == 0:
                continue
            rows = runner.run_op(op, d, sel, budget, env, copy_gbps, progress, report)
            report.rows += rows
            table = runner.format_table(op, d, rows, env, copy_gbps)
            notes = runner.format_targets(op, rows)
            notes += [f"  unavailable: {p} ({why})" for (o, p), why in report.skipped.items() if o == op.name]
            if not args.no_save and rows:
                out_dir = os.path.join(args.results_dir, slug)
                csv_path = os.path.join(out_dir, f"{op.name}.csv")
                runner.write_csv(csv_path, rows)
                notes.append(f"  rows appended to {os.path.relpath(csv_path)}")
                if not args.no_plot:
                    png = os.path.join(out_dir, f"{op.name}.png")
                    title = (f"{op.name} on {env['device_name']} | torch {env['torch']} | git {env['git_sha']} "
                             f"| {env['date']}")
                    why = runner.plot(png, op.name, rows, title, copy_gbps)
                    notes.append(f"  {why}" if why else f"  plot: {os.path.relpath(png)}")
            tables.append(table + ("\n" + "\n".join(notes) if notes else ""))
            # print as each family finishes, so a long run shows its results early
            progress.close()
            print(tables[-1] + "\n", flush=True)
    progress.close()

    if report.failures:
        print("kxops providers that failed:", file=sys.stderr)
        for r in report.failures:
            print(f"  {r['op']} {r['case']} {r['provider']} {r['mode']}: {r['status']}", file=sys.stderr)
        return 1
    if not report.rows:
        print("benchmarks: nothing ran (check --op/--case/--provider filters)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
