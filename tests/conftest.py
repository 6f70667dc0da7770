import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. It must be switched on
# before any @triton.jit function is defined, i.e. before kxops is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
