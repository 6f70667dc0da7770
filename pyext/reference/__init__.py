"""Pure PyTorch references: the specification each kxops backend is proven equal to. They import
nothing from the package above them.

`kxops.reference.rope(x, ...)` / `rope_qk(q, k, ...)` take the same arguments as `kxops.rope` and run
the reference (eager PyTorch, differentiable); `rope_impl.rope_ref` is the same on the kernel
contract's normalised arguments. Likewise `linear_attention`, `causal_dot_product`,
`linear_attention_step` and `linear_attention_impl.linear_attention_ref`; `sparse_softmax` (sparsemax, entmax15,
entmax_bisect, topk_softmax and their losses)."""

from . import linear_attention as linear_attention_impl  # noqa: F401
from . import rope as rope_impl  # noqa: F401
from .linear_attention import causal_dot_product, linear_attention, linear_attention_step  # noqa: F401
from .rope import grid_positions, rope, rope_qk, rope_schedule, text_image_positions  # noqa: F401
from . import sparse_softmax  # noqa: F401
