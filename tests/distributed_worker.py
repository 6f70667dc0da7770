"""The cases of kxops.distributed.linear_attention, run in W gloo processes on the loopback interface:

    python tests/distributed_worker.py W OUT_DIR [CASE ...]

Every rank builds the whole sequence from the same seed, runs its piece through the distributed call,
and holds its output, its gradients, the initial state's gradient (rank 0) and the final state to the
float64 reference over the whole sequence under the equivalence rule (tests/testing.py). Each rank
writes OUT_DIR/rank<r>.json, {case: "ok" or what went wrong}; tests/test_linear_attention_distributed.py
reads them. Bad-input cases expect the same error on every rank, never a hang: every collective waits at
most TIMEOUT seconds.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback

TIMEOUT = 60.0  # seconds any collective may wait (the process group's default timeout)
W_LENGTHS = {  # pieces per world size: uneven, with an empty piece inside and at the end
    "uneven": {1: [11], 2: [0, 11], 3: [7, 0, 12], 4: [5, 0, 17, 2]},
    "tail": {1: [9], 2: [9, 0], 3: [4, 9, 0], 4: [3, 8, 1, 0]},
    "even": {1: [6], 2: [6, 6], 3: [6, 6, 6], 4: [6, 6, 6, 6]},
}
# final-state gradient shares of the ranks (powers of two: they sum exactly to the whole)
SHARES = {1: [1.0], 2: [0.5, 0.5], 3: [0.5, 0.25, 0.25], 4: [0.5, 0.25, 0.125, 0.125]}


def _case(name, lengths="uneven", dtype="float32", B=2, H=2, Dk=6, Dv=5, init=True, final=True, backend="auto",
          strided=False, **opts):
    return name, dict(lengths=lengths, dtype=dtype, B=B, H=H, Dk=Dk, Dv=Dv, init=init, final=final, backend=backend,
                      strided=strided, opts=opts)


FEATURES = ("elu1", "relu", "identity", "taylor")
# identity with normalize divides by q . z, which random inputs bring near 0: any change of summation
# order moves the output without bound (the single-process tests leave it out as well)
CASES = dict(
    [_case(f"{fm}-{'norm' if n else 'raw'}", feature_map=fm, normalize=n, init=n, final=not n, Dk=7 if n else 6)
     for fm in FEATURES for n in (True, False) if (fm, n) != ("identity", True)]
    + [_case(f"global-{fm}", feature_map=fm, causal=False, lengths="tail") for fm in FEATURES]
    + [_case("global-raw", feature_map="relu", causal=False, normalize=False),
       _case("even-no-state", lengths="even", init=False, final=False),
       _case("strided", strided=True, lengths="tail"),
       _case("rope", rope=True),
       _case("rope-interleaved-taylor", rope=True, interleaved=True, feature_map="taylor", lengths="tail"),
       _case("rope-positions", rope=True, positions=True, rope_base=500.0),
       _case("global-rope", rope=True, causal=False),
       _case("bf16", dtype="bfloat16", rope=True),
       _case("fp16", dtype="float16", feature_map="relu"),
       _case("fp64", dtype="float64", rope=True, feature_map="taylor"),
       _case("scale", scale=0.3, eps=1e-3),
       _case("reference-backend", backend="reference"),
       _case("triton-backend", backend="triton", B=1, H=1, Dk=4, Dv=3)])
SPECIAL = ["no-grad", "q-grad-only", "chained", "bytes", "bad-heads", "bad-Dk", "bad-Dv", "bad-batch", "bad-dtype",
           "bad-feature-map", "bad-rope-one-rank", "bad-local-int", "bad-local-qk", "not-in-group", "timeout"]
ALL = list(CASES) + SPECIAL  # "timeout" last: it leaves a group with an abandoned collective behind


# ----------------------------------------------------------------------------------------------

def _inputs(spec, W, seed=1):
    import torch
    dtype = getattr(torch, spec["dtype"])
    lengths = W_LENGTHS[spec["lengths"]][W]
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    B, H, Dk, Dv = spec["B"], spec["H"], spec["Dk"], spec["Dv"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)
    if spec["strided"]:  # (B, H, T, D) memory seen as (B, T, H, D); then sliced per rank
        q, k, v = (rnd(B, H, T, d).transpose(1, 2) for d in (Dk, Dk, Dv))
    else:
        q, k, v = rnd(B, T, H, Dk), rnd(B, T, H, Dk), rnd(B, T, H, Dv)
    F = Dk + 1 if spec["opts"].get("feature_map") == "taylor" else Dk
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    S0 = torch.randn(B, H, F, Dv, generator=g).to(acc) if spec["init"] else None
    z0 = torch.rand(B, H, F, generator=g).to(acc) if spec["init"] else None
    gout = torch.randn(B, T, H, Dv, generator=g).to(dtype)
    gS, gz = torch.randn(B, H, F, Dv, generator=g).to(acc), torch.randn(B, H, F, generator=g).to(acc)
    positions = None
    if spec["opts"].get("positions"):
        positions = torch.randint(0, 3 * T + 1, (B, T), generator=g)
    return lengths, (q, k, v), (S0, z0), (gout, gS, gz), positions


def _reference(spec, qkv, state, grads_out, positions, dtype64: bool):
    """Outputs and gradients of the single-process call over the whole sequence: the reference, in
    float64 (dtype64) or in the inputs' dtype. For float64 inputs the two coincide and the rule's bar
    would be the floor alone, below what the single-process kernel itself meets (its float64 sums run
    in another order: ~20 ulp on dq): there the single-process kxops call, the issue's yardstick, sets
    the bar instead of the reference in the inputs' dtype."""
    import kxops
    import torch
    conv = (lambda t: None if t is None else t.double()) if dtype64 else (lambda t: t)
    leaves = [conv(t).detach().requires_grad_() for t in qkv]
    st = [None if t is None else conv(t).detach().requires_grad_() for t in state]
    opts = dict(spec["opts"])
    if opts.pop("positions", None):
        opts["positions"] = positions
    single = not dtype64 and qkv[0].dtype == torch.float64
    out, (S, z) = kxops.linear_attention(*leaves, initial_state=(st[0], st[1]) if st[0] is not None else None,
                                         output_final_state=True, backend="auto" if single else "reference",
                                         **opts)
    gout, gS, gz = (conv(t) for t in grads_out)
    loss = (out * gout.to(out.dtype)).sum()
    if spec["final"]:
        loss = loss + (S * gS.to(S.dtype)).sum() + (z * gz.to(z.dtype)).sum()
    wrt = leaves + [t for t in st if t is not None]
    gs = torch.autograd.grad(loss, wrt)
    return out, S, z, gs


def _run_case(name, spec, rank, W, group=None, lengths_override=None):
    import kxops
    import torch
    from testing import assert_close_to_ref

    lengths, qkv, (S0, z0), (gout, gS, gz), positions = _inputs(spec, W)
    if lengths_override is not None:
        lengths = lengths_override
        T = sum(lengths)
        qkv = tuple(t[:, :T] for t in qkv)
        gout = gout[:, :T]
        positions = None if positions is None else positions[:, :T]
    ref64 = _reference(spec, qkv, (S0, z0), (gout, gS, gz), positions, True)
    reflp = _reference(spec, qkv, (S0, z0), (gout, gS, gz), positions, False)
    a = sum(lengths[:rank])
    b = a + lengths[rank]
    mine = [t[:, a:b].detach().requires_grad_() for t in qkv]
    st = [None if t is None else t.detach().clone().requires_grad_() for t in (S0, z0)]
    opts = dict(spec["opts"])
    if opts.pop("positions", None):
        opts["positions"] = positions[:, a:b]
    out, (S, z) = kxops.distributed.linear_attention(
        *mine, group=group, initial_state=(st[0], st[1]) if st[0] is not None else None, output_final_state=True,
        backend=spec["backend"], **opts)
    share = SHARES[len(lengths)][rank]
    loss = (out * gout[:, a:b].to(out.dtype)).sum()
    if spec["final"]:
        loss = loss + share * ((S * gS.to(S.dtype)).sum() + (z * gz.to(z.dtype)).sum())
    loss.backward()
    # the final state is bitwise the same on every rank (gathered before any check can fail, so that
    # a failing rank never leaves the others waiting)
    import torch.distributed as dist
    flat = torch.cat((S.detach().reshape(-1), z.detach().reshape(-1)))
    every = [torch.empty_like(flat) for _ in range(len(lengths))]
    dist.all_gather(every, flat, group=group)
    sl = slice(a, b)
    assert_close_to_ref(out, ref64[0][:, sl], reflp[0][:, sl], "out")
    assert_close_to_ref(S, ref64[1], reflp[1], "final S")
    assert_close_to_ref(z, ref64[2], reflp[2], "final z")
    for i, n in enumerate("qkv"):
        assert_close_to_ref(mine[i].grad, ref64[3][i][:, sl], reflp[3][i][:, sl], f"d{n}")
    if S0 is not None:
        if rank == 0:
            assert_close_to_ref(st[0].grad, ref64[3][3], reflp[3][3], "dS0")
            assert_close_to_ref(st[1].grad, ref64[3][4], reflp[3][4], "dz0")
        else:
            assert st[0].grad is None and st[1].grad is None, "initial_state read on a rank other than 0"
    assert all(torch.equal(e, every[0]) for e in every), "final state differs across ranks"


def _expect_error(call, exc, text):
    try:
        call()
    except exc as e:
        assert text in str(e), f"expected {text!r} in {str(e)!r}"
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected {exc.__name__}({text!r}), got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc.__name__}({text!r}), nothing raised")


def _special(name, rank, W):
    import kxops
    import torch
    import torch.distributed as dist
    from testing import assert_close_to_ref

    la = kxops.distributed.linear_attention
    g = torch.Generator().manual_seed(5)

    def piece(T=4, B=2, H=2, Dk=6, Dv=5, dtype=torch.float32):
        return (torch.randn(B, T, H, Dk, generator=g).to(dtype), torch.randn(B, T, H, Dk, generator=g).to(dtype),
                torch.randn(B, T, H, Dv, generator=g).to(dtype))

    last = rank == W - 1
    if name == "no-grad":
        spec = CASES["rope"]
        lengths, qkv, st, _, _ = _inputs(spec, W)
        a = sum(lengths[:rank])
        b = a + lengths[rank]
        with torch.no_grad():
            out, (S, z) = la(*(t[:, a:b] for t in qkv), initial_state=st, output_final_state=True, rope=True)
        ref = kxops.linear_attention(*(t.double() for t in qkv), initial_state=tuple(t.double() for t in st),
                                     output_final_state=True, rope=True, backend="reference")
        reflp = kxops.linear_attention(*qkv, initial_state=st, output_final_state=True, rope=True,
                                       backend="reference")
        assert not out.requires_grad
        assert_close_to_ref(out, ref[0][:, a:b], reflp[0][:, a:b])
        assert_close_to_ref(S, ref[1][0], reflp[1][0], "S")
    elif name == "q-grad-only":  # only rank 0's q needs a gradient: every rank still runs the backward
        spec = CASES["even-no-state"]
        lengths, qkv, _, (gout, _, _), _ = _inputs(spec, W)
        a = sum(lengths[:rank])
        b = a + lengths[rank]
        mine = [t[:, a:b].detach() for t in qkv]
        mine[0].requires_grad_(rank == 0)
        out = la(*mine)
        assert out.requires_grad
        (out * gout[:, a:b]).sum().backward()
        if rank == 0:
            leaves = [t.double().requires_grad_() for t in qkv]
            ref = kxops.linear_attention(*leaves, backend="reference")
            dq = torch.autograd.grad((ref * gout.double()).sum(), leaves[0])[0]
            leaves32 = [t.requires_grad_() for t in (x.clone() for x in qkv)]
            ref32 = kxops.linear_attention(*leaves32, backend="reference")
            dq32 = torch.autograd.grad((ref32 * gout).sum(), leaves32[0])[0]
            assert_close_to_ref(mine[0].grad, dq[:, a:b], dq32[:, a:b], "dq")
    elif name == "chained":  # two calls, the first one's final state the second one's initial state
        spec = CASES["rope"]
        lengths, qkv, st, (gout, gS, gz), _ = _inputs(spec, W)
        T = sum(lengths)
        half = T // 2
        rs = [torch.arange(T)[sum(lengths[:r]):sum(lengths[:r + 1])] for r in range(W)]

        def run(qkv, st):
            leaves = [t.detach().requires_grad_() for t in qkv]
            s = [t.detach().clone().requires_grad_() for t in st]
            outs = []
            state = (s[0], s[1])
            for lo, hi in ((0, half), (half, T)):  # each call splits its part of the sequence over the ranks
                idx = rs[rank]
                idx = idx[(idx >= lo) & (idx < hi)]
                pos = torch.arange(lo, hi)
                mine_pos = idx if idx.numel() else pos[:0]
                o, state = la(*(t[:, mine_pos] for t in leaves), initial_state=state, output_final_state=True,
                              rope=True, positions=mine_pos)
                outs.append((mine_pos, o))
            loss = sum((o * gout[:, p]).sum() for p, o in outs) + SHARES[W][rank] * (
                (state[0] * gS).sum() + (state[1] * gz).sum())
            loss.backward()
            return outs, state, [t.grad for t in leaves], [t.grad for t in s]

        outs, state, dqkv, dst = run(qkv, st)
        ref = _reference(dict(opts=dict(rope=True), final=True), qkv, st, (gout, gS, gz), None, True)
        reflp = _reference(dict(opts=dict(rope=True), final=True), qkv, st, (gout, gS, gz), None, False)
        for p, o in outs:
            assert_close_to_ref(o, ref[0][:, p], reflp[0][:, p], "out")
        assert_close_to_ref(state[0], ref[1], reflp[1], "final S")
        mine = torch.cat([p for p, _ in outs])
        for i, n in enumerate("qkv"):
            # a leaf sliced by two calls: the rank's rows hold the gradient, the others zero
            assert_close_to_ref(dqkv[i][:, mine], ref[3][i][:, mine], reflp[3][i][:, mine], f"d{n}")
        if rank == 0:
            assert_close_to_ref(dst[0], ref[3][3], reflp[3][3], "dS0")
            assert_close_to_ref(dst[1], ref[3][4], reflp[3][4], "dz0")
    elif name == "bytes":  # per call: 512 header bytes + one state forward, one (or two) states backward
        for T in (3, 40):
            q, k, v = (t.requires_grad_() for t in piece(T=T))
            kxops.distributed.communication_stats(reset=True)
            out = la(q, k, v)
            fwd = kxops.distributed.communication_stats(reset=True)
            out.sum().backward()
            bwd = kxops.distributed.communication_stats(reset=True)
            state = 2 * 2 * 6 * (5 + 1) * 4
            assert fwd == dict(collectives=2, sent_bytes=512 + state, received_bytes=(W - 1) * (512 + state)), fwd
            assert bwd == dict(collectives=1, sent_bytes=state, received_bytes=(W - 1) * state), bwd
            out, (S, z) = la(q, k, v, output_final_state=True)
            kxops.distributed.communication_stats(reset=True)
            (out.sum() + S.sum()).backward()
            assert kxops.distributed.communication_stats()["sent_bytes"] == 2 * state
            kxops.distributed.communication_stats(reset=True)  # global: one all_reduce each way
            out = la(q, k, v, causal=False, output_final_state=True)[0]
            out.sum().backward()
            glob = kxops.distributed.communication_stats(reset=True)
            assert glob == dict(collectives=3, sent_bytes=512 + 2 * state,
                                received_bytes=(W - 1) * 512 + 2 * state), glob
    elif name.startswith("bad-"):
        what = name[4:]
        kw = {}
        if what == "heads":
            args = piece(H=3 if last else 2)
        elif what == "Dk":
            args = piece(Dk=8 if last else 6)
        elif what == "Dv":
            args = piece(Dv=4 if rank == 0 else 5)
        elif what == "batch":
            args = piece(B=1 if last else 2)
        elif what == "dtype":
            args = piece(dtype=torch.float64 if last else torch.float32)
        elif what == "feature-map":
            args, kw = piece(), dict(feature_map="relu" if last else "elu1")
        elif what == "rope-one-rank":
            args, kw = piece(), dict(rope=last)
        elif what == "local-int":
            q, k, v = piece()
            args = ((q * 10).to(torch.int32) if rank == 1 else q, k, v)
        elif what == "local-qk":
            q, k, v = piece()
            args = (q, k[..., :5] if rank == 0 else k, v)
        expected = {"heads": (ValueError, "heads differs across the ranks of the group (by rank: "),
                    "Dk": (ValueError, "Dk differs"), "Dv": (ValueError, "Dv differs"),
                    "batch": (ValueError, "batch differs"),
                    "dtype": (ValueError, "dtype differs across the ranks of the group (by rank: ['float32'"),
                    "feature-map": (ValueError, "feature_map differs"),
                    "rope-one-rank": (ValueError, "rope differs"),
                    "local-int": (TypeError, "rank 1 of the group rejected its arguments"),
                    "local-qk": (ValueError, "rank 0 of the group rejected its arguments")}[what]
        _expect_error(lambda: la(*args, **kw), *expected)
        if what == "local-int":  # the rank's own message travels to the others
            _expect_error(lambda: la(*args, **kw), TypeError, "float")
    elif name == "not-in-group":  # the ranks but the last form a group; the last one calls with it
        sub = dist.new_group(list(range(W - 1)))
        if last:
            _expect_error(lambda: la(*piece(), group=sub), ValueError, "is not a member of `group`")
        else:
            _run_case(name, CASES["rope"], rank, W - 1, group=sub,
                      lengths_override=W_LENGTHS["even"][W][:W - 1])
    elif name == "timeout":  # the last rank never calls: the others get a TimeoutError, not a hang
        fresh = dist.new_group(list(range(W)))
        if last:
            time.sleep(4.0)
        else:
            t0 = time.time()
            _expect_error(lambda: la(*piece(), group=fresh, timeout=1.5), TimeoutError, "timed out on rank")
            assert time.time() - t0 < 3.5, "the timeout was not honoured"
    else:
        raise KeyError(name)


def _rank_main(rank, W, out_dir, names):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import kxops  # noqa: F401

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    results = {}
    for name in names:
        if name == "triton-backend" and "triton" not in kxops.backends():
            results[name] = "skip: no Triton here"
            continue
        t0 = time.time()
        try:
            if name in CASES:
                _run_case(name, CASES[name], rank, W)
            else:
                _special(name, rank, W)
            results[name] = "ok"
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc()
        results[name + ".seconds"] = round(time.time() - t0, 3)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        if name != "timeout":  # (the timeout case leaves its group unusable; the world group is fine)
            dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


def main(argv):
    import torch.multiprocessing as mp
    W, out_dir = int(argv[0]), os.path.abspath(argv[1])
    names = argv[2:] or ALL
    os.makedirs(out_dir, exist_ok=True)
    mp.start_processes(_rank_main, args=(W, out_dir, names), nprocs=W, start_method="spawn")


if __name__ == "__main__":
    main(sys.argv[1:])
