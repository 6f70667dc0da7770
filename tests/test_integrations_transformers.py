"""kxops.integrations.transformers: tiny Hugging Face models with kxops RoPE equal the unpatched models
(logits and every parameter's gradient, under the equivalence rule against the unpatched model in float64),
kxops really runs, and remove() restores transformers' own code."""
import copy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

from kxops.integrations.transformers import SUPPORTED_MODEL_TYPES, apply_kxops_rope  # noqa: E402
from testing import (BACKEND_IDS, BACKENDS, assert_close_to_ref, assert_raises_with, bad_input_params,  # noqa: E402
                     run_isolated)

B, S, VOCAB = 2, 16, 128
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=256)
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)
QWEN2_VL_VISION = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2,
                       spatial_merge_size=2, temporal_patch_size=1)
QWEN3_VL_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=2,
                       spatial_merge_size=2, temporal_patch_size=1, deepstack_visual_indexes=[0])


def _mrope(sections):
    return dict(rope_type="default", rope_theta=10000.0, mrope_section=sections)


def _left_padded(pad):
    """attention_mask and position_ids (batch, seq) of sequences left-padded by pad[b] tokens, as generate() makes."""
    mask = (torch.arange(S)[None] >= torch.tensor(pad)[:, None]).long()
    return dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


def _model(case):
    """(tiny randomly initialised fp32 model, its forward kwargs besides input_ids) for a case id."""
    t = transformers
    if case == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**TEXT)), {}
    if case == "llama-llama3-leftpad":
        return t.LlamaForCausalLM(t.LlamaConfig(**TEXT, rope_parameters=LLAMA3)), _left_padded([3, 0])
    if case == "qwen2-gapped-positions":  # not an offset of 0..S-1 (RoPE is blind to those): one per row
        positions = torch.stack([torch.randperm(4 * S)[:S].sort().values for _ in range(B)])
        return t.Qwen2ForCausalLM(t.Qwen2Config(**TEXT)), dict(position_ids=positions)
    if case == "qwen3-yarn":  # attention_scaling != 1
        return t.Qwen3ForCausalLM(t.Qwen3Config(**TEXT, head_dim=16, rope_parameters=YARN)), {}
    # M-RoPE position ids (t, h, w) of every token: (3, batch, seq), any values
    if case == "qwen2_vl-mrope-3d":
        cfg = t.Qwen2VLConfig(text_config=dict(TEXT, rope_parameters=_mrope([2, 3, 3])), vision_config=QWEN2_VL_VISION)
        return t.Qwen2VLForConditionalGeneration(cfg), dict(position_ids=torch.randint(0, 40, (3, B, S)))
    if case == "qwen3_vl-interleaved-mrope-3d":
        cfg = t.Qwen3VLConfig(text_config=dict(TEXT, head_dim=16, rope_parameters=_mrope([4, 2, 2])),
                              vision_config=QWEN3_VL_VISION)
        return t.Qwen3VLForConditionalGeneration(cfg), dict(position_ids=torch.randint(0, 40, (3, B, S)))
    raise ValueError(case)


CASES = ["llama", "llama-llama3-leftpad", "qwen2-gapped-positions", "qwen3-yarn", "qwen2_vl-mrope-3d",
         "qwen3_vl-interleaved-mrope-3d"]


def _logits_and_grads(model, ids, kw):
    """Logits (batch, seq, vocab) and every parameter's gradient of a fixed random projection of them."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, **kw).logits
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (logits * weight.to(logits.dtype)).sum().backward()
    return [logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None]


def _rope_calls(fn, op="kxops::rope_qk"):
    """fn's result and how many calls of `op` it made (profiler events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.name == op for e in prof.events())


def _assert_patched_equals_transformers(model, kw, rope_calls):
    ids = torch.randint(0, VOCAB, (B, S))
    ref64 = _logits_and_grads(copy.deepcopy(model).double(), ids, kw)
    ref32 = _logits_and_grads(model, ids, kw)
    with apply_kxops_rope(model):
        out, calls = _rope_calls(lambda: _logits_and_grads(model, ids, kw))
    assert calls == rope_calls
    names = ["logits"] + [n for n, p in model.named_parameters() if p.grad is not None]
    assert len(out) == len(ref64) == len(names)
    for o, r64, r32, name in zip(out, ref64, ref32, names):
        assert_close_to_ref(o, r64, r32, name)


@pytest.mark.parametrize("case", CASES)
def test_patched_model_equals_transformers(case):
    model, kw = _model(case)
    model.eval()  # no dropout
    _assert_patched_equals_transformers(model, kw, 2 * TEXT["num_hidden_layers"])  # forward and backward


def test_gradient_checkpointing():
    """The recomputed forward receives the same (cos, sin) objects: kxops runs there too."""
    model, kw = _model("qwen2-gapped-positions")
    model.gradient_checkpointing_enable()
    model.train()
    _assert_patched_equals_transformers(model, kw, 3 * TEXT["num_hidden_layers"])


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKENDS, ids=["reference-cpu"] + BACKEND_IDS)
def test_backend(backend, device):
    model, kw = _model("qwen3_vl-interleaved-mrope-3d")
    model.eval().to(device)
    kw = {name: t.to(device) for name, t in kw.items()}
    ids = torch.randint(0, VOCAB, (B, S), device=device)
    op = {"reference": "kxops::rope_qk_reference", "triton": "kxops::rope_qk_triton"}.get(backend, "kxops::rope_qk")
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(ids, **kw).logits
        ref32 = model(ids, **kw).logits
        with apply_kxops_rope(model, backend=backend):
            out, calls = _rope_calls(lambda: model(ids, **kw).logits, op)
    assert calls == TEXT["num_hidden_layers"]
    assert_close_to_ref(out, ref64, ref32, "logits")


def test_decoding_with_kv_cache():
    """Prefill, then one token at a time from the cache (positions S, S+1): the logits of every step."""
    model, _ = _model("llama-llama3-leftpad")
    model.eval()
    model64 = copy.deepcopy(model).double()
    ids = torch.randint(0, VOCAB, (B, S + 2))

    def steps(m):
        with torch.no_grad():
            out = m(ids[:, :S], use_cache=True)
            logits, cache = [out.logits], out.past_key_values
            for s in (S, S + 1):
                out = m(ids[:, s:s + 1], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                cache = out.past_key_values
        return logits

    ref64, ref32 = steps(model64), steps(model)
    with apply_kxops_rope(model):
        out, calls = _rope_calls(lambda: steps(model))
    assert calls == 3 * TEXT["num_hidden_layers"]
    for i, (o, r64, r32) in enumerate(zip(out, ref64, ref32)):
        assert_close_to_ref(o, r64, r32, f"logits of step {i}")


def test_bf16_model():
    model, kw = _model("qwen2-gapped-positions")
    model.eval()
    ids = torch.randint(0, VOCAB, (B, S))
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(ids, **kw).logits
        model.bfloat16()
        ref_bf16 = model(ids, **kw).logits
        with apply_kxops_rope(model):
            out = model(ids, **kw).logits
    assert_close_to_ref(out, ref64, ref_bf16, "bf16 logits")


def _rotary(model):
    return model.model.rotary_emb


def test_remove_restores_transformers():
    original = modeling_llama.apply_rotary_pos_emb
    model, _ = _model("llama")
    ids = torch.randint(0, VOCAB, (B, S))
    with torch.no_grad():
        before = model(ids).logits
        handle = apply_kxops_rope(model)
        assert modeling_llama.apply_rotary_pos_emb is not original
        handle.remove()
        _, calls = _rope_calls(lambda: model(ids))
        after = model(ids).logits
    assert calls == 0
    assert modeling_llama.apply_rotary_pos_emb is original
    assert not _rotary(model)._forward_hooks
    assert torch.equal(before, after)
    handle.remove()  # a second remove() changes nothing


def test_without_model_patches_every_model_of_the_types():
    function, forward = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRotaryEmbedding.forward
    qwen2_function = modeling_qwen2.apply_rotary_pos_emb
    ids = torch.randint(0, VOCAB, (B, S))
    with apply_kxops_rope(model_types="llama"):
        assert modeling_qwen2.apply_rotary_pos_emb is qwen2_function
        model, _ = _model("llama")  # built after the patch
        with torch.no_grad():
            _, calls = _rope_calls(lambda: model(ids))
    assert calls == TEXT["num_hidden_layers"]
    assert modeling_llama.apply_rotary_pos_emb is function
    assert modeling_llama.LlamaRotaryEmbedding.forward is forward


def test_shared_patch_lasts_until_the_last_handle_is_removed():
    original = modeling_llama.apply_rotary_pos_emb
    model, _ = _model("llama")
    ids = torch.randint(0, VOCAB, (B, S))
    with apply_kxops_rope(model_types=["llama"]):
        with apply_kxops_rope(model):
            pass
        assert modeling_llama.apply_rotary_pos_emb is not original
        with torch.no_grad():
            _, calls = _rope_calls(lambda: model(ids))
        assert calls == TEXT["num_hidden_layers"]  # through the class patch
    assert modeling_llama.apply_rotary_pos_emb is original


def test_cos_without_kxops_arguments_falls_back_to_transformers():
    """A (cos, sin) that did not come from a patched module, or was copied on its way (device moves), is rotated
    by transformers' function; bf16 q with fp32 cos (autocast) promotes as transformers does."""
    original = modeling_llama.apply_rotary_pos_emb
    model, _ = _model("llama")
    q, k = torch.randn(B, 4, S, 16), torch.randn(B, 2, S, 16)
    x, pos = torch.randn(B, S, 64), torch.arange(S)[None]
    with apply_kxops_rope(model):
        cos, sin = _rotary(model)(x, pos)
        patched = modeling_llama.apply_rotary_pos_emb
        plain = cos.clone()
        assert all(torch.equal(a, b) for a, b in zip(patched(q, k, plain, sin), original(q, k, plain, sin)))
        _, calls = _rope_calls(lambda: patched(q, k, plain, sin))
        assert calls == 0
        for a, b in zip(patched(q.bfloat16(), k.bfloat16(), cos, sin), original(q.bfloat16(), k.bfloat16(), cos, sin)):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b)


def test_import_kxops_does_not_import_transformers():
    run_isolated("import kxops, kxops.integrations, sys; assert 'transformers' not in sys.modules")


def _conflicting_backends():
    with apply_kxops_rope(model_types="llama", backend="cpu"):
        apply_kxops_rope(model_types="llama", backend="reference")


BAD = [
    ("backend", lambda: apply_kxops_rope(backend="gpu"), ValueError, "backend must be one of"),
    ("backend-conflict", _conflicting_backends, ValueError,
     "backend 'reference': LlamaRotaryEmbedding is switched with backend 'cpu' by a live handle"),
    ("model_types", lambda: apply_kxops_rope(model_types=["llama", "gpt2"]), ValueError,
     "model_types must be among"),
    ("model-not-module", lambda: apply_kxops_rope("llama"), TypeError, "model must be a torch.nn.Module"),
    ("model-without-rope", lambda: apply_kxops_rope(torch.nn.Linear(2, 2)), ValueError,
     "model (Linear) has no text rotary embedding"),
    ("model-of-other-type", lambda: apply_kxops_rope(_model("llama")[0], model_types="qwen2"), ValueError,
     "has no text rotary embedding of model_types ['qwen2']"),
]


def _rotary_functions():
    return {m: vars(sys.modules[m])["apply_rotary_pos_emb"] for m, _ in SUPPORTED_MODEL_TYPES.values()
            if m in sys.modules}


@pytest.mark.parametrize(**bad_input_params(BAD))
def test_bad_input(call, exc, message):
    before = _rotary_functions()
    assert_raises_with(call, exc, message)
    assert _rotary_functions() == before  # nothing patched, or all of it undone
