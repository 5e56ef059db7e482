"""Epilogue shared by the kernels: the activations of launch.ACTIVATIONS on fp32 tiles, with NaN and
±inf coming out as torch's own activations give them (float64 torch is the tests' oracle)."""
import triton
import triton.language as tl


@triton.jit
def activate(y, ACTIVATION: tl.constexpr):
    """y: fp32 tile. ACTIVATION: "none" | "relu" | "gelu" (exact, erf) | "gelu_tanh"."""
    if ACTIVATION == "relu":
        # not tl.maximum(y, 0): it lowers to maxnum, which returns 0 for NaN; NaN < 0 is False
        y = tl.where(y < 0.0, 0.0, y)
    elif ACTIVATION == "gelu":
        # ±inf as torch: +inf -> inf, -inf -> -inf * 0 = NaN; NaN stays NaN through erf
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # tanh from exp(-2|z|) <= 1: no overflow, and no libdevice lookup (it moves across versions);
        # NaN stays NaN (exp, where), and ±inf give inf / NaN as torch's 0.5·y·(1 + tanh(z)) does
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        y = 0.5 * y * (1.0 + tl.where(z >= 0, t, -t))
    return y
