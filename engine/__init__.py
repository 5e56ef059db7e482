"""sparse-engine: prune torch models, convert them to CSR/BSR, and run them on custom kernels.

`import engine` is cheap and never requires the C++ extension or Triton: missing pieces fall back
to plain torch with a one-time warning (or raise when a backend is forced)."""
from . import formats
from .formats import BSR, CSR
from .ops import sparse_linear

__all__ = ["formats", "CSR", "BSR", "sparse_linear", "SparseLinear", "sparsify", "load"]
from .version import __version__


def __getattr__(name):
    # Heavier pieces load on first use so `import engine` stays light.
    if name == "SparseLinear":
        from .modules import SparseLinear
        return SparseLinear
    if name == "sparsify":  # whole transformer blocks first, then the remaining nn.Linear layers
        from .transformer import sparsify
        return sparsify
    if name == "load":
        from .runtime import load
        return load
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
