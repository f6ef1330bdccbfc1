"""Triton kernels of the window-attention ops (forward only; autograd differentiates the
references): the 1-D band in `sliding_triton.py`, the 2-D Swin windows and NAT/DiNAT
neighbourhoods in `grid_triton.py`. Imported only on the first CUDA call."""
from .grid_triton import neighborhood_attention_2d, window_attention_2d
from .sliding_triton import sliding_window_attention

__all__ = ["sliding_window_attention", "window_attention_2d", "neighborhood_attention_2d"]
