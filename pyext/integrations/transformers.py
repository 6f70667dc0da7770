"""Hugging Face transformers models with kxops RoPE: one call switches their attention to kxops.rope_qk.

    from kxops.integrations.transformers import apply_kxops_rope
    handle = apply_kxops_rope(model)   # this model; apply_kxops_rope() switches every supported model
    ...
    handle.remove()                    # transformers' own rotary code again

How it works. A model's text rotary embedding module computes (cos, sin) of shape (batch or 1, seq, head_dim)
once per forward and every attention layer calls its modeling file's `apply_rotary_pos_emb(q, k, cos, sin)`
with q, k of shape (batch, heads, seq, head_dim). The patch leaves the rotary module's output as it is and
attaches to `cos` what kxops needs to compute the same angles itself: the position ids, the module's
inv_freq (already scaled: linear, dynamic, llama3, YaRN ...), its attention_scaling and, for M-RoPE, how
the rotary pairs are dealt to the (t, h, w) axes. The modeling file's `apply_rotary_pos_emb` is replaced
by one that calls kxops.rope_qk on the (batch, seq, heads, head_dim) views when `cos` carries that and
transformers' own function otherwise: a (cos, sin) from an unpatched module, or one copied on its way to
the attention (moved to another device, detached), is still rotated correctly, by transformers.
"""
from __future__ import annotations

import functools
import importlib
import sys
import warnings
from typing import Iterable, NamedTuple, Optional

import torch
import transformers
from torch import Tensor

from ..rope import rope_qk
from ..reference.rope import schedule_lists

__all__ = ["apply_kxops_rope", "KxopsRopeHandle", "SUPPORTED_MODEL_TYPES", "TESTED_TRANSFORMERS"]

TESTED_TRANSFORMERS = "5.17.0"

# model_type -> (modeling module, its text rotary embedding class). The attention of each calls the
# module's apply_rotary_pos_emb(q, k, cos, sin) with the (cos, sin) of that class; the vision towers of the
# -VL models use other functions and keep them.
SUPPORTED_MODEL_TYPES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRotaryEmbedding"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RotaryEmbedding"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3RotaryEmbedding"),
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLRotaryEmbedding"),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextRotaryEmbedding"),
}
_BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_TAG = "_kxops_rope"


class _RopeArgs(NamedTuple):
    """What `cos` carries: kxops.rope_qk's arguments for the angles the rotary module computed."""
    positions: Tensor          # (batch or 1, seq) int, or (batch or 1, seq, 3) for M-RoPE
    inv_freq: Tensor           # (head_dim/2,) float32 on cos's device
    scaling: float             # transformers' attention_scaling: cos and sin are multiplied by it
    axis_layout: str
    sections: Optional[list]
    backend: str


class KxopsRopeHandle:
    """What one apply_kxops_rope call changed. remove() undoes it (so does leaving a `with` block); patches
    shared with other live handles stay until the last of them is removed."""

    def __init__(self):
        self._undo = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_kxops_rope(model: Optional[torch.nn.Module] = None, *, model_types: Optional[Iterable[str]] = None,
                     backend: str = "auto") -> KxopsRopeHandle:
    """Make the attention of Hugging Face Llama, Qwen2, Qwen3, Qwen2-VL and Qwen3-VL text models rotate q and k
    with kxops.rope_qk (q: (batch, heads_q, seq, head_dim), k: (batch, heads_k, seq, head_dim), positions from
    the model's position_ids: (batch, seq), or (3, batch, seq) for M-RoPE).

    model: a loaded model (any head: LlamaForCausalLM, Qwen2VLForConditionalGeneration, ...): only its text
        rotary embedding modules are switched. None: every model of `model_types`, loaded or loaded later.
    model_types: config model_type names to switch, a subset of SUPPORTED_MODEL_TYPES (default: all of them).
    backend: the kxops backend, "auto" (the C++ kernel for CPU tensors, the CUDA kernel for GPU tensors),
        "cpu", "cuda", "triton" or "reference".
    Returns a KxopsRopeHandle: handle.remove() (or `with apply_kxops_rope(model): ...`) restores transformers'
    own rotary code. Any rope_type works (default, linear, dynamic, llama3, YaRN, longrope): the angles use
    the module's current inv_freq and its attention_scaling multiplies the result as it does cos and sin.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"apply_kxops_rope: backend must be one of {_BACKENDS}, got {backend!r}")
    types = list(SUPPORTED_MODEL_TYPES) if model_types is None else [model_types] if isinstance(
        model_types, str) else list(model_types)
    unknown = [t for t in types if t not in SUPPORTED_MODEL_TYPES]
    if unknown:
        raise ValueError(f"apply_kxops_rope: model_types must be among {sorted(SUPPORTED_MODEL_TYPES)}, "
                         f"got {unknown}")
    if not transformers.__version__.startswith(TESTED_TRANSFORMERS.rsplit(".", 1)[0] + "."):
        warnings.warn(f"kxops.integrations.transformers was checked against transformers {TESTED_TRANSFORMERS}, "
                      f"this is {transformers.__version__}", stacklevel=2)
    wanted = {SUPPORTED_MODEL_TYPES[t] for t in types}
    handle = KxopsRopeHandle()
    if model is None:
        classes = [(module := importlib.import_module(m), getattr(module, c)) for m, c in sorted(wanted)]
        for _, cls in classes:
            live = _PATCHED.get((cls, "forward"))
            if live is not None and live.backend != backend:
                raise ValueError(f"apply_kxops_rope: backend {backend!r}: {cls.__name__} is switched with backend "
                                 f"{live.backend!r} by a live handle; remove that one first")
        for module, cls in classes:
            handle._undo.append(_patch(module, "apply_rotary_pos_emb", _kxops_apply_rotary_pos_emb))
            handle._undo.append(_patch(cls, "forward", functools.partial(_tagging_forward, backend), backend))
        return handle
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"apply_kxops_rope: model must be a torch.nn.Module or None, got {type(model).__name__}")
    rotaries = [m for m in model.modules() if (type(m).__module__, type(m).__name__) in wanted]
    if not rotaries:
        raise ValueError(f"apply_kxops_rope: model ({type(model).__name__}) has no text rotary embedding of "
                         f"model_types {types}")
    for m in rotaries:
        _layout(m, strict=True)
    for m in rotaries:
        handle._undo.append(_patch(sys.modules[type(m).__module__], "apply_rotary_pos_emb",
                                   _kxops_apply_rotary_pos_emb))
        handle._undo.append(m.register_forward_hook(functools.partial(_tag_hook, backend), with_kwargs=True).remove)
    return handle


# ----------------------------------------------------------------------------------------------
# Patching with reference counts: several handles may share one patched function.

class _Patch:
    def __init__(self, original, patched, inherited, backend):
        self.original, self.patched, self.inherited, self.backend = original, patched, inherited, backend
        self.users = 0


_PATCHED: dict = {}  # (owner, name) -> _Patch


def _patch(owner, name, make, backend=None):
    """owner.name = make(original) unless already patched; returns the undo of this use. The last undo
    restores the original, unless something else has replaced the patch since (then that stays)."""
    key = (owner, name)
    entry = _PATCHED.get(key)
    if entry is None:
        original = getattr(owner, name)
        entry = _PATCHED[key] = _Patch(original, make(original), name not in vars(owner), backend)
        setattr(owner, name, entry.patched)
    entry.users += 1

    def undo():
        entry.users -= 1
        if entry.users == 0:
            del _PATCHED[key]
            if vars(owner).get(name) is not entry.patched:
                return
            if entry.inherited:
                delattr(owner, name)
            else:
                setattr(owner, name, entry.original)
    return undo


# ----------------------------------------------------------------------------------------------
# The rotary module side: attach kxops' arguments to the cos it returns.

def _tagging_forward(backend, forward):
    @functools.wraps(forward)
    def forward_with_kxops(self, x, position_ids, *args, **kwargs):
        out = forward(self, x, position_ids, *args, **kwargs)
        _tag(self, position_ids, out, backend)
        return out
    return forward_with_kxops


def _tag_hook(backend, module, args, kwargs, out):
    position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    _tag(module, position_ids, out, backend)


def _tag(module, position_ids, out, backend):
    cos = out[0]
    layout = _layout(module, strict=False)
    if layout is None or not isinstance(position_ids, Tensor) or position_ids.is_floating_point():
        return
    axis_layout, sections = layout
    if sections is not None:
        if position_ids.dim() != 3 or position_ids.shape[0] != len(sections):
            return
        position_ids = position_ids.permute(1, 2, 0)  # (3, batch, seq) -> (batch, seq, 3), a view
    elif position_ids.dim() != 2:
        return
    inv_freq = module.inv_freq.to(device=cos.device, dtype=torch.float32)
    setattr(cos, _TAG, _RopeArgs(position_ids, inv_freq, float(module.attention_scaling), axis_layout, sections,
                                 backend))


_LAYOUTS: dict = {}  # (class, mrope_section, pairs) -> (axis_layout, sections) or None


def _layout(module, strict):
    """(axis_layout, sections) of kxops equal to how `module` deals its rotary pairs to the position axes:
    ("halves", None) for 1-D RoPE. None (strict: ValueError) when kxops has no equal layout."""
    if not hasattr(module, "mrope_section"):
        return "halves", None
    half = module.inv_freq.numel()
    key = (type(module), tuple(module.mrope_section), half)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _mrope_layout(module, half)
    found = _LAYOUTS[key]
    if found is None:
        msg = (f"apply_kxops_rope: {type(module).__name__} with mrope_section {list(module.mrope_section)} and "
               f"{half} rotary pairs deals the pairs to the (t, h, w) axes in a way kxops has no layout for")
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + "; transformers' rotary code is used")
    return found


def _mrope_layout(module, half):
    # The module's own recomposition, run on frequencies that are the axis numbers, gives each pair's axis.
    probe = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 1, half).contiguous()
    try:
        axis = module.recomposition_frequencies(probe)[0, 0]
    except (RuntimeError, IndexError, ValueError):
        return None
    if axis.shape != (2 * half,) or not torch.equal(axis[:half], axis[half:]):
        return None
    axis = axis[:half].long().tolist()
    sections = [axis.count(a) for a in range(3)]
    for axis_layout in ("mrope", "alternating"):
        if schedule_lists(2 * half, 1.0, 3, axis_layout, sections)[1] == axis:
            return axis_layout, sections
    return None


# ----------------------------------------------------------------------------------------------
# The attention side: the modeling file's apply_rotary_pos_emb.

def _kxops_apply_rotary_pos_emb(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        rope = getattr(cos, _TAG, None)
        if rope is None or unsqueeze_dim not in (1, 2) or q.dim() != 4 or 2 * rope.inv_freq.numel() != q.shape[-1]:
            return original(q, k, cos, sin, unsqueeze_dim)
        # transformers' q * cos promotes (bf16 q with fp32 cos under autocast gives fp32): so does this.
        dtype = torch.promote_types(q.dtype, cos.dtype)
        if unsqueeze_dim == 1:  # (batch, heads, seq, head_dim) -> (batch, seq, heads, head_dim), free views
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = rope_qk(q.to(dtype), k.to(dtype), rope.positions, inv_freq=rope.inv_freq,
                       axis_layout=rope.axis_layout, sections=rope.sections, backend=rope.backend)
        if rope.scaling != 1.0:  # transformers scales cos and sin; the rotation is linear, so scale after it
            q, k = q.mul_(rope.scaling), k.mul_(rope.scaling)
        if unsqueeze_dim == 1:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k
    return apply_rotary_pos_emb
