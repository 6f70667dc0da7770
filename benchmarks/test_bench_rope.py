"""pytest-benchmark suite for RoPE: the harness's cases at small sizes, every provider this machine can
run (CPU providers only without a GPU; Triton/CUDA providers only on CUDA tensors).

    pytest benchmarks -q                          # quick pass/fail run (a few rounds each)
    pytest benchmarks --benchmark-only --benchmark-group-by=group
Each test checks the provider's output against the reference before timing it."""
from __future__ import annotations

import csv
import os

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import rope as bench_rope
from benchmarks import runner, timing

OP = bench_rope.OP
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# torch.compile costs seconds per graph on a small CPU: one case proves the provider works.
COMPILE_CASES = {"qk-B2-S128-Hq4-Hk2-D64-fp32", "qk-B2-S128-Hq4-Hk2-D64-bf16"}


def _params():
    for device in DEVICES:
        for case in OP.small_cases(device):
            for p in OP.providers:
                if device not in p.devices or (p.kind == "compile" and case.name not in COMPILE_CASES):
                    continue
                for mode in OP.modes:
                    yield pytest.param(case, p, mode, id=f"{device}-{case.name}-{p.name}-{mode}")


@pytest.mark.parametrize("case,provider,mode", list(_params()))
def test_rope_provider(benchmark, case, provider, mode):
    why = provider.available()
    if why:
        pytest.skip(f"{provider.name}: {why}")
    ref = OP.reference
    if ref.available():
        pytest.skip(f"reference: {ref.available()}")
    ref_out = ref.setup(case, OP.make_inputs(case, 0))()
    inputs = OP.make_inputs(case, 0)
    fn = provider.setup(case, inputs)
    if fn is None:
        pytest.skip(f"{provider.name} cannot express {case.name}")
    err = OP.check(ref_out, fn(), case)
    assert err <= OP.tolerance(case.dtype), f"{provider.name} differs from the reference: rel RMS {err:.2e}"

    step = timing.make_step(fn, inputs, mode, OP.outputs, 0)
    benchmark.group = f"rope {case.name} {mode}"
    benchmark.extra_info.update(bytes=OP.bytes_moved(case, mode), provider=provider.name, mode=mode)
    if case.device == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


def test_bytes_moved_counts_reads_and_writes():
    case = next(c for c in OP.small_cases("cpu") if c.name == "qk-B2-S128-Hq4-Hk2-D64-fp32")
    n = 2 * 128 * (4 + 2) * 64
    assert OP.bytes_moved(case, "fwd") == 2 * n * 4
    assert OP.bytes_moved(case, "bwd") == 2 * n * 4
    assert OP.bytes_moved(case, "fwd_bwd") == 4 * n * 4


def test_varlen_case_packs_fixed_lengths():
    case = next(c for c in OP.small_cases("cpu") if c.get("lens"))
    inputs = OP.make_inputs(case, 0)
    assert inputs.cu_seqlens.dtype == torch.int32
    assert inputs.cu_seqlens[-1].item() == sum(case["lens"]) == inputs.q.shape[0]
    assert bench_rope.varlen_lengths(8, 16384) == bench_rope.varlen_lengths(8, 16384)
    assert sum(bench_rope.varlen_lengths(8, 16384)) == 16384


def test_harness_end_to_end(tmp_path):
    """run_op -> table -> CSV -> plot on two tiny cases with the cheap CPU providers."""
    if OP.reference.available():
        pytest.skip(OP.reference.available())
    small = [c for c in OP.small_cases("cpu") if c.name in ("rope-B2-S128-H4-D64-fp32", "qk-B2-S128-Hq4-Hk2-D64-fp32")]
    op = OP.with_cases(lambda device: small)
    sel = runner.Selection(providers=["reference", "kxops-cpu"])
    budget = timing.Budget(cpu_min_run_s=0.01)
    env = timing.environment("cpu")
    report = runner.Report()
    rows = runner.run_op(op, "cpu", sel, budget, env, 10.0, runner.Progress(1, enabled=False), report)
    ran = {r["provider"] for r in rows}
    assert "reference" in ran
    assert {r["status"] for r in rows} == {"ok"}, [r["status"] for r in rows]
    assert len(rows) == len(small) * len(ran) * 3
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        if r["provider"] == "reference":
            assert r["speedup_vs_ref"] == pytest.approx(1.0)
    table = runner.format_table(op, "cpu", rows, env, 10.0)
    assert "rope-B2-S128-H4-D64-fp32" in table and "vs best other" in table

    path = tmp_path / "cpu" / "rope.csv"
    runner.write_csv(str(path), rows)
    runner.write_csv(str(path), rows)  # appends, one header
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2 * len(rows)
    assert set(runner.CSV_COLUMNS) <= set(got[0])
    assert got[0]["torch"] == torch.__version__ and got[0]["op"] == "rope"

    why = runner.plot(str(tmp_path / "cpu" / "rope.png"), "rope", rows, "test", 10.0)
    if why is None:
        assert os.path.getsize(tmp_path / "cpu" / "rope.png") > 0


def test_cli_lists_rope(capsys):
    assert cli.main(["--list", "--device", "cpu", "--op", "rope"]) == 0
    out = capsys.readouterr().out
    assert "rope-B4-S2048-H16-D64-fp32" in out and "reference" in out


def test_speedup_against_best_other():
    rows = [dict(mode="fwd", provider=p, kind=k, status="ok", median_ms=t)
            for p, k, t in (("reference", "reference", 4.0), ("a", "kxops", 1.0), ("b", "anchor", 2.0))]
    runner._speedups(rows)
    s = {r["provider"]: r for r in rows}
    assert s["a"]["speedup_vs_best_other"] == pytest.approx(2.0)
    assert s["b"]["speedup_vs_best_other"] == pytest.approx(0.5)
    assert s["a"]["speedup_vs_ref"] == pytest.approx(4.0)
