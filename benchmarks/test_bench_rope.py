"""pytest-benchmark suite for RoPE: the harness's cases at small sizes, every provider this machine can
run (CPU providers only without a GPU; Triton/CUDA providers only on CUDA tensors).

    pytest benchmarks -q                          # quick pass/fail run (a few rounds each)
    pytest benchmarks --benchmark-only --benchmark-group-by=group
Each test checks the provider's output against the reference before timing it."""
from __future__ import annotations

import csv
import dataclasses
import os
import re
import types

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import rope as bench_rope
from benchmarks import runner, timing
from benchmarks.core import MODES, Target

OP = bench_rope.OP
# torch.compile costs seconds per graph on a small CPU: one case proves the provider works.
COMPILE_CASES = {"qk-B2-S128-Hq4-Hk2-D64-fp32", "qk-B2-S128-Hq4-Hk2-D64-bf16"}


@pytest.mark.parametrize("case,provider,mode", runner.provider_params(OP, COMPILE_CASES))
def test_rope_provider(benchmark, case, provider, mode):
    runner.provider_test(OP, benchmark, case, provider, mode)


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


def _small(name_part):
    return next(c for c in OP.small_cases("cpu") if name_part in c.name)


def _run_small(cases, providers, modes=MODES):
    op = OP.with_cases(lambda device: cases)
    sel = runner.Selection(providers=providers, modes=modes)
    rows = runner.run_op(op, "cpu", sel, timing.Budget(cpu_min_run_s=0.01, host_block_s=0.002, host_blocks=3),
                         timing.environment("cpu"), 10.0, runner.Progress(1, enabled=False), runner.Report())
    return op, sel, rows


def test_decoding_cases_are_forward_only_host_timed_and_ratioed():
    """Per-case modes: an inference case runs fwd only, on inputs that do not require grad, host-timed, with
    every row's time as a multiple of the torch.mul yardstick; a training case still runs every mode."""
    if OP.reference.available():
        pytest.skip(OP.reference.available())
    decode, train = _small("decode-qk-B2-S1-Hq4-Hk2-D64-offsets"), _small("qk-B2-S128-Hq4-Hk2-D64-fp32")
    inputs = OP.make_inputs(decode, 0)
    assert not decode.needs_grad and not inputs.q.requires_grad and inputs.grad == ()
    assert inputs.offsets.dtype == torch.int64 and inputs.offsets.shape == (2,)
    op, sel, rows = _run_small([decode, train], ["reference", "kxops-cpu", "torch.mul"])
    # the plan also counts torch.mul's fwd on the training case, where its setup declines
    assert len(rows) == runner.plan_size(op, "cpu", sel) - 1 == 3 + 2 * 3
    assert {r["status"] for r in rows} == {"ok"}, [(r["provider"], r["status"]) for r in rows]
    drows = [r for r in rows if r["case"] == decode.name]
    assert {(r["mode"], r["timing"]) for r in drows} == {("fwd", "host")}
    assert {r["provider"] for r in drows} == {"reference", "kxops-cpu", "torch.mul"}
    assert {r["mode"] for r in rows if r["case"] == train.name} == {"fwd", "bwd", "fwd_bwd"}
    by = {r["provider"]: r for r in drows}
    ratio = by["kxops-cpu"]["median_ms"] / by["torch.mul"]["median_ms"]
    assert by["kxops-cpu"]["ratio_to_yardstick"] == pytest.approx(ratio)
    assert by["torch.mul"].get("speedup_vs_best_other") is None and by["torch.mul"]["check_err"] is None
    table = runner.format_table(op, "cpu", rows, timing.environment("cpu"), 10.0)
    assert "x torch.mul" in table and "timing" in table


def test_host_timing_divides_back_to_back_calls_by_their_number(monkeypatch):
    """Each block is: synchronize, n calls, synchronize, timed by the wall clock; per call = block / n."""
    clock, events = [0.0], []
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(timing, "synchronize", lambda device: events.append("sync"))

    def call():
        clock[0] += 5e-6
        events.append("call")
    t = timing.time_host(call, "cuda", timing.Budget(host_block_s=1e-3, host_blocks=4))
    assert (t.median_ms, t.p20_ms, t.p80_ms) == pytest.approx((5e-3,) * 3)
    trace = "".join("|" if e == "sync" else "c" for e in events)
    assert re.fullmatch(r"(\|c+\|)+", trace)
    blocks = re.findall("c+", trace)  # the last 4 are timed: the same n, lasting at least host_block_s
    assert len(set(blocks[-4:])) == 1 and len(blocks[-1]) * 5e-6 >= 1e-3


def test_inplace_provider_is_checked_on_its_first_call():
    """The in-place provider rotates its inputs at every call: its first output matches the reference, a
    second call's does not, so the runner checks the first call, before any other."""
    if OP.reference.available():
        pytest.skip(OP.reference.available())
    case = _small("qk-B2-S128-Hq4-Hk2-D64-fp32")
    ref = OP.reference.setup(case, OP.make_inputs(case, 0))()
    inputs = OP.make_inputs(case, 0)
    fn = OP.provider("kxops-cpu-inplace").setup(case, inputs)
    first = fn()
    assert first[0].data_ptr() == inputs.q.data_ptr()
    assert OP.check(ref, first, case) <= OP.tolerance(case.dtype)
    assert OP.check(ref, fn(), case) > OP.tolerance(case.dtype)
    _, _, rows = _run_small([case], ["kxops-cpu-inplace"])
    assert [(r["provider"], r["mode"], r["status"]) for r in rows] == [("kxops-cpu-inplace", "fwd", "ok")]


def _rotate_half(x, cos, sin):  # HF's apply_rotary_pos_emb: x cos + rotate_half(x) sin
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _fake_flashinfer():
    """flashinfer.rope's four entries as their docs define them, in PyTorch (rotate-half layout only)."""
    def rotate(x, pos, cos_sin):  # x (tokens, H, D); cos_sin (positions, D): cos | sin halves
        c, s = cos_sin[pos].chunk(2, -1)
        return _rotate_half(x.float(), torch.cat((c, c), -1)[:, None], torch.cat((s, s), -1)[:, None]).to(x.dtype)

    def table(pos, d, theta):
        ang = torch.arange(int(pos.max()) + 1)[:, None] / theta ** (torch.arange(0, d, 2) / d)
        return torch.cat((ang.cos(), ang.sin()), -1)

    def pos_ids(q, k, pos, interleave, rope_theta):
        assert not interleave
        return tuple(rotate(t, pos, table(pos, t.shape[-1], rope_theta)) for t in (q, k))

    def cache(pos, q, k, head_size, cos_sin, is_neox):
        assert is_neox
        return tuple(rotate(t.view(len(pos), -1, head_size), pos, cos_sin).flatten(1) for t in (q, k))

    def pos_ids_(q, k, *args, **kw):
        for t, o in zip((q, k), pos_ids(q, k, *args, **kw)):
            t.copy_(o)

    def cache_(pos, q, k, *args, **kw):
        for t, o in zip((q, k), cache(pos, q, k, *args, **kw)):
            t.copy_(o)
    return types.SimpleNamespace(apply_rope_pos_ids=pos_ids, apply_rope_pos_ids_inplace=pos_ids_,
                                 apply_rope_with_cos_sin_cache=cache, apply_rope_with_cos_sin_cache_inplace=cache_)


@pytest.mark.parametrize("name", ["decode-qk-B2-S1-Hq4-Hk2-D64-offsets", "offset17", "qk-varlen", "qk-B2-S128"])
def test_gpu_anchor_glue_rotates_like_the_reference(monkeypatch, name):
    """Liger's and FlashInfer's providers (GPU-only libraries) run here on stand-ins that implement what
    those libraries document: the layouts, positions and cos/sin caches the providers build, their views
    and their in-place variants must reproduce the reference, so that the GPU rows time the right thing."""
    if OP.reference.available():
        pytest.skip(OP.reference.available())
    monkeypatch.setattr(bench_rope, "_flashinfer_build", lambda: (_fake_flashinfer(), None))
    monkeypatch.setattr(bench_rope, "_liger_fn", lambda: lambda q, k, cos, sin: (
        _rotate_half(q, cos[:, None], sin[:, None]), _rotate_half(k, cos[:, None], sin[:, None])))
    case = _small(name)
    ref = OP.reference.setup(case, OP.make_inputs(case, 0))()
    for p in ("liger", "flashinfer", "flashinfer-inplace", "flashinfer-cache", "flashinfer-cache-inplace"):
        inputs = OP.make_inputs(case, 0)
        out = OP.provider(p).setup(case, inputs)()
        assert OP.check(ref, out, case) <= OP.tolerance(case.dtype), p
        assert (out[0].data_ptr() == inputs.q.data_ptr()) == p.endswith("inplace"), p


def test_targets_report_each_goal():
    rows = [dict(case="c", mode="fwd", timing=t, provider=p, kind=k, status="ok", median_ms=ms)
            for p, k, t, ms in (("reference", "reference", "host", 0.1), ("kxops-cpu", "kxops", "host", 0.004),
                                ("liger", "anchor", "host", 0.003), ("torch.mul", "yardstick", "host", 0.002),
                                ("kxops-cuda-graph", "kxops", "device", 0.001))]
    runner._speedups(rows)
    by = {r["provider"]: r for r in rows}
    assert by["kxops-cpu"]["ratio_to_yardstick"] == pytest.approx(2.0)
    assert by["kxops-cpu"]["speedup_vs_best_other"] == pytest.approx(0.75)  # liger: not the yardstick, not the graph
    assert by["kxops-cuda-graph"]["speedup_vs_best_other"] is None and by["kxops-cuda-graph"]["speedup_vs_ref"] is None
    op = dataclasses.replace(OP, targets=[Target("c", "kxops-cpu", 20.0, max_us=3, faster_than=("liger", "fla"),
                                                 max_ratio=2.5)])
    lines = runner.format_targets(op, rows)
    assert len(lines) == 5
    assert lines[0].endswith("25.00x met") and lines[1].endswith("4.0 us MISSED")
    assert "faster than liger" in lines[2] and lines[2].endswith("MISSED") and lines[3].endswith("n/a")
    assert lines[4].endswith("2.00x met") and "torch.mul" in lines[4]
