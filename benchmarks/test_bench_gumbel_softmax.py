"""pytest-benchmark suite for the Gumbel / perturb-max softmaxes: the harness's cases at small sizes through
every provider this machine can run, each checked before it is timed (kxops against the reference with the
same Philox key, torch's samplers for what their outputs must be); kxops backends whose kernels are not
built yet skip. torch.compile of the reference is left out here (12-15 s per graph on 2 cores, over this
suite's budget); the benchmark runs it (`--provider compile`).

    pytest benchmarks/test_bench_gumbel_softmax.py -q --benchmark-disable
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from benchmarks import runner, timing
from benchmarks import gumbel_softmax as bench
from benchmarks.core import Provider, Target

OP = bench.OP
COMPILE_CASES: set = set()


@pytest.mark.parametrize("case,provider,mode", runner.provider_params(OP, COMPILE_CASES, ("fwd",)))
def test_gumbel_softmax_provider(benchmark, case, provider, mode):
    runner.provider_test(OP, benchmark, case, provider, mode)


def test_cases_and_targets_are_consistent():
    """Every target names a declared case and provider; the GPU and CPU target cases are the issue's shapes."""
    names = {c.name for d in ("cpu", "cuda") for c in OP.cases(d)}
    assert len(names) == len(OP.cases("cpu")) + len(OP.cases("cuda"))
    providers = {p.name for p in OP.providers}
    for t in OP.targets:
        assert t.case in names, t.case
        for p in (t.provider,) if isinstance(t.provider, str) else t.provider:
            assert p in providers, p
        for group in t.faster_than:
            for p in (group,) if isinstance(group, str) else group:
                assert p in providers, p
    gpu = {(c["fn"], c["R"], c["N"], c.dtype) for c in bench.gpu_target_cases()}
    assert gpu == {(f, 4096, 32768, dt) for f in ("gumbel_softmax", "gumbel_max")
                   for dt in (torch.bfloat16, torch.float32)}
    cpu = {(c["fn"], c["R"], c["N"], c.dtype) for c in bench.cpu_target_cases()}
    assert cpu == {("gumbel_softmax", 256, 32768, torch.float32)}
    goals = {(t.case, t.min_frac_copy, t.faster_than, t.faster_by, t.modes) for t in OP.targets}
    for c in bench.gpu_target_cases():
        if c["fn"] == "gumbel_softmax":
            assert (c.name, 0.8, (), 1.0, ("fwd_bwd",)) in goals
            assert (c.name, None, ("torch-gumbel-softmax",), 3.0, ("fwd_bwd",)) in goals
        else:
            assert (c.name, None, ("torch-gumbel-max",), 5.0, ("fwd",)) in goals
    for c in bench.cpu_target_cases():
        assert (c.name, None, ("torch-gumbel-softmax",), 2.0, ("fwd_bwd",)) in goals
    # every function on both devices; perturb-max only narrow (O(K N^2) per row)
    for d in ("cpu", "cuda"):
        assert {c["fn"] for c in OP.cases(d)} == set(bench.FNS)
        assert all(c["N"] <= (1024 if d == "cuda" else 128) for c in OP.cases(d) if c["fn"] == "perturb_max")
        assert all(c.modes == ("fwd",) for c in OP.cases(d) if c["fn"] == "gumbel_max")


def _kxops_reference_provider() -> Provider:
    """kxops' public functions on backend="reference": the path the kernels take (the generator, the key
    drawn from it), over the reference ops; it stands in for a kernel that is not built yet."""
    return Provider("kxops-reference", bench._setup_kxops("reference"), kind="kxops")


def test_first_call_of_a_kxops_provider_draws_the_references_noise():
    """The seeding scheme: kxops' public function with the provider's generator draws, on its first call, the
    key `expected` uses, so its output equals the reference's (samples to the row); later calls draw other
    noise, as a user's do."""
    for case in OP.small_cases("cpu"):
        want = OP.expected(case, OP.make_inputs(case, 3))
        inputs = OP.make_inputs(case, 3)
        fn = _kxops_reference_provider().setup(case, inputs)
        out = fn()
        assert OP.check(want, out, case) == 0.0, case.name
        if case["fn"] != "perturb_max":  # no noise there
            assert not torch.equal(out, fn()), case.name


def test_checks_tell_other_noise_from_the_same():
    """Another key fails every check of a kxops-like provider; torch's samplers pass their property checks
    and fail them when their output is not a distribution / not in range."""
    case = bench._case("cpu", torch.float32, "gumbel_softmax", 64, 100)
    hard = bench._case("cpu", torch.float32, "gumbel_softmax_hard", 64, 100)
    gmax = bench._case("cpu", torch.float32, "gumbel_max", 64, 100)
    tol = OP.tolerance(torch.float32)
    for c in (case, hard, gmax):
        inputs = OP.make_inputs(c, 0)
        want = OP.expected(c, inputs)
        other = bench._reference_fn(c)(inputs.x.detach(), torch.tensor([12345], dtype=torch.int64))
        assert OP.check(want, other, c) > tol, c.name
        assert OP.check(want, want, c) == 0.0, c.name
    for c in (case, hard):
        y = bench.setup_torch_gumbel_softmax(c, OP.make_inputs(c, 0))()
        assert bench.check_distribution(None, y, c) <= tol
        assert bench.check_distribution(None, 2 * y, c) > tol
        assert math.isinf(bench.check_distribution(None, y[:, :-1], c))
    s = bench.setup_torch_gumbel_max(gmax, OP.make_inputs(gmax, 0))()
    assert bench.check_samples(None, s, gmax) == 0.0
    assert math.isinf(bench.check_samples(None, s + gmax["N"], gmax))
    assert math.isinf(OP.check(OP.expected(gmax, OP.make_inputs(gmax, 0)), s.float(), gmax))
    # the hard output must be an exact one-hot: the reference's (one-hot + soft - soft) is
    y = OP.expected(hard, OP.make_inputs(hard, 0))
    assert bench._is_one_hot(y) and math.isinf(OP.check(y, 0.5 * y, hard))


def test_expected_perturb_max_in_pieces_is_one_call(monkeypatch):
    """Rows are independent: the reference's perturb-max on pieces of rows (what `expected` does where one call
    would not fit) is the same function as one call."""
    case = bench._case("cpu", torch.float64, "perturb_max", 9, 12)
    inputs = OP.make_inputs(case, 0)
    whole = bench.setup_reference(case, inputs)()
    monkeypatch.setattr(bench, "PIECE_BYTES", 4 * bench.EXPECTED_UNITS * bench._unit_bytes(case) // case["R"])
    pieces = bench.expected(case, inputs)
    assert torch.allclose(whole.detach(), pieces, rtol=1e-12, atol=1e-15)


def test_reference_skips_perturb_max_that_would_not_fit():
    big = bench._case("cpu", torch.float32, "perturb_max", 4096, 256)
    with pytest.raises(bench.Skip, match="GiB"):
        bench.setup_reference(big, bench.Inputs({"x": torch.empty(0)}))
    small = bench._case("cpu", torch.float32, "perturb_max", 4, 16)
    bench.reference_fits(small)


def test_run_checks_kxops_against_the_reference_and_torch_by_property():
    """The harness end to end on small cases: the reference, kxops' public function (backend="reference")
    and torch's samplers run and pass their checks; another key is a MISMATCH, a failure of a kxops
    provider. (Two functions, forward only: each (case, provider) costs a gc.collect of ~0.3 s here.)"""
    cs = [bench._case("cpu", torch.float32, fn, 8, 300) for fn in ("gumbel_softmax_hard", "gumbel_max")]
    wrong = dataclasses.replace(_kxops_reference_provider(), name="kxops-wrong-key",
                                setup=lambda case, inputs: _shifted_seed(case, inputs))
    op = dataclasses.replace(OP, cases=lambda device: cs, record_memory=False,
                             providers=OP.providers + [_kxops_reference_provider(), wrong])
    sel = runner.Selection(providers=["reference", "torch-gumbel-softmax", "torch-gumbel-max", "kxops-reference",
                                      "kxops-wrong-key"], modes=("fwd",))
    budget = timing.Budget(cpu_min_run_s=0.01, cpu_min_samples=1)
    report = runner.Report()
    rows = runner.run_op(op, "cpu", sel, budget, timing.environment("cpu"), 10.0,
                         runner.Progress(1, enabled=False), report)
    status = {(r["case"].split("-")[0], r["provider"]): r["status"] for r in rows}
    assert status == {(fn, p): "MISMATCH" if p == "kxops-wrong-key" else "ok"
                      for fn, ps in (("gumbel_softmax_hard", ("reference", "torch-gumbel-softmax")),
                                     ("gumbel_max", ("reference", "torch-gumbel-max")))
                      for p in ps + ("kxops-reference", "kxops-wrong-key")}, status
    assert all(r["gbps"] > 0 for r in rows)
    assert {r["provider"] for r in report.failures} == {"kxops-wrong-key"}


def _shifted_seed(case, inputs):
    """A kxops-like provider sampling with another seed than the reference's."""
    return bench._setup_kxops("reference")(case, bench.Inputs(dict(inputs), grad=inputs.grad, seed=inputs.seed + 1))


def test_min_frac_copy_target():
    rows = [dict(case="c", mode="fwd_bwd", timing="device", provider=p, kind="kxops", status="ok", median_ms=ms,
                 frac_copy_bw=f) for p, ms, f in (("kxops-cuda", 1.0, 0.7), ("kxops-triton", 0.8, 0.85))]
    op = dataclasses.replace(OP, targets=[Target("c", ("kxops-cuda", "kxops-triton"), min_frac_copy=0.8),
                                          Target("c", "kxops-cuda", min_frac_copy=0.8)])
    lines = runner.format_targets(op, rows)
    assert len(lines) == 2
    assert "kxops-triton (fastest of" in lines[0] and ">= 80% of copy bandwidth" in lines[0]
    assert lines[0].endswith("85% met") and lines[1].endswith("70% MISSED")
    rows[1]["status"] = rows[0]["status"] = "MISMATCH"
    assert runner.format_targets(op, rows)[0].endswith("n/a")
