"""tnorm from Python: RMSNorm, L2Norm, LayerNorm, their residual-add forms and RMSNorm + RoPE on CPU and
CUDA arrays, through libtnorm; the norms' results quantized in the same pass (FP8, INT8, MXFP8, NVFP4), and
quantize on its own.

Arrays are taken through DLPack (numpy, torch, cupy, jax...) without a copy, strided rows included,
and results come back as the caller's own array type. The shared library is found, on first use, at
$TNORM_LIBRARY, else beside this package (a libtnorm*.so* copied into it), else by
ctypes.util.find_library("tnorm").
"""

from ._lib import cuda_available, library_path, library_version
from ._ops import add_layer_norm, add_rms_norm, l2_norm, layer_norm, quantize, rms_norm, rms_norm_rope

__version__ = "0.2.0"

__all__ = ["rms_norm", "rms_norm_rope", "l2_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "quantize",
           "library_path", "library_version", "cuda_available", "__version__"]
