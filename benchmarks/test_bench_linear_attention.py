"""pytest-benchmark suite for linear attention: the harness's cases at small sizes through every provider
this machine can run (CPU providers only without a GPU; Triton/CUDA providers only on CUDA tensors),
each checked against the reference before it is timed; and the pieces of the family the GPU rows rely
on (the check where the reference cannot run, FLA's and fast-transformers' glue, the targets, the CPU
peak memory) tested here on the host.

    pytest benchmarks/test_bench_linear_attention.py -q --benchmark-disable
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import linear_attention as bench
from benchmarks import runner, timing
from benchmarks.core import Provider, Target

OP = bench.OP
# torch.compile costs seconds per graph on a small CPU: one case, forward only, proves the provider works.
COMPILE_CASES = {"la-B2-T67-H2-D24-elu1-norm-fp32", "la-B2-T256-H4-D64-elu1-norm-bf16"}
_BUDGET = timing.Budget(cpu_min_run_s=0.01, cpu_min_samples=2, host_block_s=0.002, host_blocks=3)


def _skip_without_reference():
    why = OP.reference.available()
    if why:
        pytest.skip(f"reference: {why}")


@pytest.mark.parametrize("case,provider,mode", runner.provider_params(OP, COMPILE_CASES, ("fwd",)))
def test_linear_attention_provider(benchmark, case, provider, mode):
    runner.provider_test(OP, benchmark, case, provider, mode)


def _small(name_part, device="cpu"):
    return next(c for c in OP.small_cases(device) if name_part in c.name)


def test_bytes_and_flops_follow_their_formulas():
    case = bench._case("cpu", torch.bfloat16, "la", 2, 4, 64, 256)
    n = 2 * 256 * 4
    assert OP.bytes_moved(case, "fwd") == n * 4 * 64 * 2
    assert OP.bytes_moved(case, "bwd") == n * 7 * 64 * 2
    assert OP.bytes_moved(case, "fwd_bwd") == n * 11 * 64 * 2
    fwd = n * (4 * 64 * 64 + bench.CHUNK * 128)
    assert [OP.flops(case, m) for m in ("fwd", "bwd", "fwd_bwd")] == [fwd, 2 * fwd, 3 * fwd]
    step = _small("step-B3-H2-D16-elu1-norm")  # q, k, v, out fp32; S and z read and written
    assert OP.bytes_moved(step, "fwd") == 3 * 2 * 4 * 16 * 4 + 2 * 4 * 3 * 2 * 16 * 17
    assert OP.flops(step, "fwd") == 4 * 3 * 2 * 16 * 16


@pytest.mark.parametrize("name", ["la-B2-T67-H2-D24-elu1-norm-fp32", "cdp-B1-T67-H2-D16-fp32"])
def test_expected_in_pieces_is_one_reference_call(monkeypatch, name):
    """Causality: the reference on pieces of the sequence, its state carried through initial_state, is the
    reference on the whole, so the check stays exact where the whole would not fit."""
    _skip_without_reference()
    case = _small(name)
    inputs = OP.make_inputs(case, 0)
    whole = bench._ref().linear_attention(inputs.q, inputs.k, inputs.v, **bench._flags(case))
    per_token = 3 * case["B"] * case["H"] * case["Dk"] * case["Dv"] * 4
    monkeypatch.setattr(bench, "PIECE_BYTES", 5 * per_token)  # pieces of 5 tokens: 14 for T = 67
    pieces = OP.expected(case, inputs)
    assert pieces.shape == whole.shape and not pieces.requires_grad
    assert OP.check(whole, pieces, case) <= 1e-6


def test_fla_shapes_that_the_reference_declines_on_an_h100():
    """On 80 GiB (72 GiB budget) the eager reference runs on two of FLA's six shapes; the others are n/a."""
    budget = 0.9 * 80 * 2**30
    runs = [c.name for c in bench.fla_cases() if bench.reference_bytes(c) <= budget]
    assert runs == ["la-B4-T2048-H16-D128-identity-bf16", "la-B8-T1024-H8-D64-identity-bf16"]


def test_reference_bytes_bounds_its_measured_peak():
    """REF_TENSORS covers what the reference allocates in every mode (CPU allocator peak: about 4 tensors
    (B, T, H, F, Dv), the bwd step also keeping the S of its retained graph live), and not by much more."""
    _skip_without_reference()
    case = bench._case("cpu", torch.float32, "la", 1, 2, 32, 256, fm="elu1", norm=True)
    inputs = OP.make_inputs(case, 0)
    fn = OP.reference.setup(case, inputs)
    peaks = [timing.cpu_peak_bytes(timing.make_step(fn, inputs, m, OP.outputs, 0)) for m in ("fwd", "bwd", "fwd_bwd")]
    assert max(peaks) <= bench.reference_bytes(case) <= 1.5 * max(peaks), peaks


def _stand_in(name):
    """A provider that runs the reference whole, never declining: something to check while the reference
    provider is n/a."""
    return Provider(name, lambda case, inputs: bench._call(bench._ref(), case, inputs), kind="anchor")


def test_reference_declines_where_it_would_not_fit_and_the_others_are_still_checked(monkeypatch):
    _skip_without_reference()
    monkeypatch.setattr(bench, "memory_budget", lambda device: 1024)
    case, step = _small("la-B2-T67"), _small("step-B3-H2-D16")
    op = dataclasses.replace(OP, providers=[OP.reference, _stand_in("stand-in")], cases=lambda device: [case, step])
    report = runner.Report()
    rows = runner.run_op(op, "cpu", runner.Selection(modes=("fwd",)), _BUDGET, timing.environment("cpu"), 10.0,
                         runner.Progress(1, enabled=False), report)
    ref = [r for r in rows if r["provider"] == "reference" and r["case"] == case.name]
    assert len(ref) == 1 and all(r["status"].startswith("n/a: its O(T Dk Dv) cumulative sum") for r in ref)
    assert all(r.get("median_ms") is None for r in ref) and not report.failures
    others = [r for r in rows if r not in ref]
    assert {r["status"] for r in others} == {"ok"} and all(r["check_err"] is not None for r in others)
    table = runner.format_table(op, "cpu", rows, timing.environment("cpu"), 10.0)
    assert "n/a: its O(T Dk Dv)" in table


def test_cpu_peak_memory_counts_the_tensors_a_call_holds_at_once():
    """A call that holds 16 MiB, frees it, then holds 8 + 4 MiB peaks at 16 MiB; what lives before the
    call is not counted."""
    before = torch.ones(2**22)  # 16 MiB already live

    def call():
        a = torch.ones(2**22)
        del a
        b, c = torch.ones(2**21), torch.ones(2**20)
        return b.add_(c[0] + before[0])  # in place: no third tensor
    assert timing.peak_memory_mib(call, "cpu") == pytest.approx(16, abs=0.5)


def _fla_stand_in(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=False, **kw):
    """chunk_linear_attn / fused_recurrent_linear_attn as FLA 0.6 documents them (and its naive.py computes):
    o_t = scale q_t^T S_t with S_t = S_(t-1) + k_t v_t^T; normalize: o_t / (scale q_t . z_t + 1e-10) with
    z_t = z_(t-1) + k_t; initial_state S, or (S, z (B, 1, H, K)) when normalising; returns (o, S) or
    (o, (S, z)), S None without output_final_state, o in q's dtype."""
    dt, scale = q.dtype, q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.float() for t in (q, k, v))
    S0, z0 = initial_state if normalize and isinstance(initial_state, tuple) else (initial_state, None)
    S = torch.einsum("bthk,bthv->bthkv", k, v).cumsum(1) + (0 if S0 is None else S0[:, None])
    o = scale * torch.einsum("bthk,bthkv->bthv", q, S)
    ht = S[:, -1] if output_final_state else None
    if not normalize:
        return o.to(dt), ht
    z = k.cumsum(1) + (0 if z0 is None else z0)
    o = o / ((scale * q * z).sum(-1, keepdim=True) + 1e-10)
    return o.to(dt), (ht, z[:, -1:])


@pytest.mark.parametrize("case", OP.small_cases("cpu"), ids=lambda c: c.name)
def test_fla_glue_computes_the_case(monkeypatch, case):
    """FLA runs on CUDA only: its providers run here on a stand-in of what FLA documents, so that the GPU
    rows time the same computation as kxops (feature map applied before the call, scale, normaliser,
    a step's state passed as initial_state and read back from the final state)."""
    _skip_without_reference()
    monkeypatch.setattr(bench, "_fla", lambda name: _fla_stand_in)
    want = OP.expected(case, OP.make_inputs(case, 0))
    ran = []
    for name in ("fla-chunk", "fla-recurrent"):
        fn = OP.provider(name).setup(case, OP.make_inputs(case, 0))
        if fn is not None:
            assert OP.check(want, fn(), case) <= OP.tolerance(case.dtype), name
            ran.append(name)
    assert ran == (["fla-recurrent"] if case["kind"] == "step" else ["fla-chunk", "fla-recurrent"])


def test_fast_transformers_glue_computes_causal_dot_product(monkeypatch):
    _skip_without_reference()

    def causal_dot_product(Q, K, V):  # (N, H, L, E), float32, contiguous, as its kernels require
        assert all(t.is_contiguous() and t.dtype == torch.float32 for t in (Q, K, V))
        return torch.einsum("nhle,nhlem->nhlm", Q, torch.einsum("nhle,nhlm->nhlem", K, V).cumsum(2))
    monkeypatch.setattr(bench, "_fast_transformers_fn", lambda: causal_dot_product)
    case = _small("cdp-")
    out = OP.provider("fast-transformers").setup(case, OP.make_inputs(case, 0))()
    assert OP.check(OP.expected(case, OP.make_inputs(case, 0)), out, case) <= OP.tolerance(case.dtype)
    for other in (_small("la-B2-T67"), _small("la-B1-T130"), _small("step-B3")):  # normalised, bf16, step
        assert OP.provider("fast-transformers").setup(other, OP.make_inputs(other, 0)) is None


def test_kxops_providers_say_what_is_missing(monkeypatch):
    monkeypatch.setattr(bench, "_kxops", lambda: type("kxops", (), {"backends": staticmethod(lambda: ["cpu"])}))
    assert bench._backend_available("cpu")() == "kxops has no linear_attention, linear_attention_step yet"


def test_targets_cover_the_issue():
    goals = {(t.case, t.provider if isinstance(t.provider, str) else "|".join(t.provider), t.modes): t
             for t in OP.targets}
    assert len(goals) == len(OP.targets)
    names = {c.name for d in ("cpu", "cuda") for c in OP.cases(d)}
    assert all(t.case in names for t in OP.targets)
    for c in bench.fla_cases():
        assert goals[(c.name, "kxops-cuda|kxops-triton", ("fwd_bwd",))].faster_by == 1.7
        assert goals[(c.name, "kxops-cuda|kxops-triton", ("fwd",))].faster_by == 1.2
    assert len(bench.fla_cases()) == 6
    cpu = [t for t in OP.targets if t.provider == "kxops-cpu"]
    assert [(t.case, t.min_speedup, t.max_mem_mib) for t in cpu] == [  # memory linear in T
        ("la-B2-T2048-H8-D64-elu1-norm-fp32", 5.0, 128), ("la-B2-T8192-H8-D64-elu1-norm-fp32", None, 512)]
    assert sum(1 for t in OP.targets if t.faster_than == ("fla-recurrent",)) == 2 * len(bench.step_cases("cuda"))


def test_targets_group_providers_and_margins():
    """A group goal uses the fastest of ours that ran, against the fastest of FLA's; faster_by is a margin;
    max_mem_mib reads the peak memory."""
    rows = [dict(case="c", mode="fwd", timing="device", provider=p, kind=k, status="ok", median_ms=ms, peak_mem_mib=m)
            for p, k, ms, m in (("kxops-cuda", "kxops", 1.0, 10.0), ("kxops-triton", "kxops", 0.8, 30.0),
                                ("fla-chunk", "anchor", 1.5, 20.0), ("fla-recurrent", "anchor", 3.0, 5.0))]
    ours, fla = ("kxops-cuda", "kxops-triton"), ("fla-chunk", "fla-recurrent")
    op = dataclasses.replace(OP, targets=[Target("c", ours, faster_than=(fla,), faster_by=1.7),
                                          Target("c", ours, faster_than=(fla,), faster_by=2.0),
                                          Target("c", "kxops-cuda", max_mem_mib=16),
                                          Target("c", "kxops-triton", max_mem_mib=16)])
    lines = runner.format_targets(op, rows)
    assert len(lines) == 4
    assert "kxops-triton (fastest of kxops-cuda/kxops-triton) >= 1.7x faster than fla-chunk" in lines[0]
    assert lines[0].endswith("(1.88x) met") and lines[1].endswith("MISSED")
    assert lines[2].endswith("10 MiB met") and lines[3].endswith("30 MiB MISSED")
    rows[1]["status"] = "MISMATCH"  # the group falls back on the one that passed
    assert "kxops-cuda (fastest of" in runner.format_targets(op, rows)[0]


def test_run_reports_cpu_memory_flops_and_step_ratios(tmp_path):
    """The CPU rows carry peak memory and TFLOP/s (which the plot draws); the step runs forward only,
    host-timed, with the torch.mul yardstick's ratio."""
    _skip_without_reference()
    la, step = _small("la-B1-T130"), _small("step-B3-H2-D16")
    op = OP.with_cases(lambda device: [la, step])
    rows = runner.run_op(op, "cpu", runner.Selection(providers=["reference", "torch.mul"], modes=("fwd", "bwd")),
                         _BUDGET, timing.environment("cpu"), 10.0, runner.Progress(1, enabled=False), runner.Report())
    assert {r["status"] for r in rows} == {"ok"}, [(r["provider"], r["status"]) for r in rows]
    lrows = [r for r in rows if r["case"] == la.name]
    assert [r["mode"] for r in lrows] == ["fwd", "bwd"]
    assert all(r["peak_mem_mib"] > 0 and r["tflops"] > 0 for r in lrows)
    srows = {r["provider"]: r for r in rows if r["case"] == step.name}
    assert {(r["mode"], r["timing"]) for r in srows.values()} == {("fwd", "host")}
    assert srows["reference"]["ratio_to_yardstick"] > 1
    table = runner.format_table(op, "cpu", rows, timing.environment("cpu"), 10.0)
    assert "peak MiB" in table and "TFLOP/s" in table and "x torch.mul" in table
    if runner.plot(str(tmp_path / "linear_attention.png"), op.name, rows, "test", 10.0) is None:
        assert (tmp_path / "linear_attention.png").stat().st_size > 0


def test_cli_lists_linear_attention(capsys):
    assert cli.main(["--list", "--device", "cpu", "--op", "linear_attention"]) == 0
    out = capsys.readouterr().out
    assert "la-B2-T2048-H8-D64-elu1-norm-fp32" in out and "fast-transformers" in out
