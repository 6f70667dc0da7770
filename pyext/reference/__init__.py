"""Pure PyTorch references: the specification each kxops backend is proven equal to.

`kxops.reference.rope(x, ...)` / `rope_qk(q, k, ...)` take the same arguments as `kxops.rope` and run
the reference (eager PyTorch, differentiable)."""

from . import rope as rope_impl  # noqa: F401
from .rope import grid_positions, rope_schedule, text_image_positions  # noqa: F401


def rope(x, positions=None, **kw):
    from ..rope import rope as _rope
    return _rope(x, positions, **kw, backend="reference")


def rope_qk(q, k, positions=None, **kw):
    from ..rope import rope_qk as _rope_qk
    return _rope_qk(q, k, positions, **kw, backend="reference")
