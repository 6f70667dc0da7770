"""kxops: fused PyTorch operators for the techniques of Su Jianlin's Scientific Spaces (kexue.fm)."""
import torch  # noqa: F401  (the extension has no rpath to libtorch: torch must load first)

from . import _C  # noqa: F401  (registers the kxops:: ops; a missing build is an ImportError, never a fallback)
from . import distributed, nn, reference
from ._dispatch import backends
from .gumbel_softmax import gumbel_max, gumbel_softmax, perturb_max_softmax
from .global_pointer import (global_pointer, global_pointer_decode, global_pointer_loss,
                             multilabel_categorical_crossentropy, sparse_multilabel_categorical_crossentropy)
from .linear_attention import causal_dot_product, linear_attention, linear_attention_step
from .rope import grid_positions, rope, rope_qk, text_image_positions
from .sparse_softmax import (entmax, entmax15, entmax15_loss, sparsemax, sparsemax_loss, topk_softmax,
                             topk_softmax_cross_entropy)

__version__ = "0.1.0"
__all__ = ["backends", "distributed", "reference", "rope", "rope_qk", "grid_positions", "text_image_positions",
           "linear_attention", "causal_dot_product", "linear_attention_step", "global_pointer", "global_pointer_loss",
           "global_pointer_decode", "multilabel_categorical_crossentropy", "sparse_multilabel_categorical_crossentropy",
           "sparsemax", "entmax15", "entmax", "topk_softmax", "sparsemax_loss", "entmax15_loss",
           "topk_softmax_cross_entropy", "gumbel_softmax", "gumbel_max", "perturb_max_softmax", "nn"]
