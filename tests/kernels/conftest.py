"""The Triton kernel tests run compiled on a GPU, else under Triton's interpreter on tiny
shapes. TRITON_INTERPRET is read when `@triton.jit` decorates, so it is switched on here,
before any test module of this folder imports a kernel module."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
