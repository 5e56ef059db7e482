"""The transformer-encoder block on the sparse kernels: `SparseEncoderLayer`, and `sparsify`, which
swaps whole blocks (nn.TransformerEncoderLayer, Hugging Face's BertLayer, the bert family's Layer)
for it before swapping the remaining nn.Linear layers (engine.modules.sparsify).

One block, per call (x: (B, S, H), nh heads of hs = H / nh):
  qkv   = x · [Wq; Wk; Wv]ᵀ + b         one sparse kernel call on the stacked (3H, H) weight
  q,k,v = strided views of qkv           (B, nh, S, hs), no copies
  ctx   = scaled_dot_product_attention   (B, S, H) after one reshape; without a mask, cpu.attention_cpu
          instead (fp32: AVX2 / AVX-512; bf16: AMX tiles): straight from qkv to ctx's (B·S, H) rows
  a     = LN1(x + ctx · Woᵀ + bo)         residual add + LayerNorm in one C++ pass over the kernel's
                                         output (cpu.add_layer_norm_); bf16 BSR on AMX: inside the
                                         kernel, before its output is written (cpu.linear_add_norm)
  y     = LN2(a + act(a · W1ᵀ + b1) · W2ᵀ + b2)   bias + activation in the kernel epilogue; both FFN
          layers in panelled CSR (cpu.pair_fits): one cpu.csr_pair_cpu call, the hidden activations kept packed
(pre-LN, `norm_first`: a = x + (LN1(x) ...), y = a + FFN(LN2(a))).
The layout, dtype and activation of every linear layer are checked once, when the block is built;
the forward pass runs the kernels through sparse_linear's skip-checks path. Inference only:
dropout is not applied.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu, formats, ops
from .modules import FORMATS, SparseLinear, detect_blocksize
from .modules import sparsify as sparsify_linears

# Activations run in the sparse kernel's epilogue; tanh-GELU runs after it, in place, in torch.
# The batched fp32 epilogue computes erf-GELU on 8 lanes (csrc/avx2.cpp gelu8; bf16 kernels: gelu512):
# fused, BERT's ffn_in + GELU took 1.84 instead of 2.10 ms (128 rows, 90 %, AMD EPYC, 2 threads;
# bench/results/peers.md). (Its scalar std::erf predecessor was 10-17x slower than the kernel.)
EPILOGUE_ACTIVATIONS = ("relu", "gelu")
_ACTIVATION_FNS = {F.relu: "relu", F.gelu: "gelu", torch.relu: "relu"}
# The activations applied after the kernel, in place on its output.
_IN_PLACE = {"gelu": torch.ops.aten.gelu_, "gelu_tanh": lambda t: torch.ops.aten.gelu_(t, approximate="tanh"),
             "relu": torch.relu_}
_CPU_BACKENDS = {"auto", "cpu"}  # SparseLinear backends under which the C++ kernels run on CPU tensors
# Hugging Face activation classes (transformers.activations), matched by name: no import of transformers.
_HF_ACTIVATIONS = {"GELUActivation": "gelu", "ReLU": "relu", "NewGELUActivation": "gelu_tanh",
                   "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh"}


def _on_cpu_kernels(*layers) -> bool:
    """Whether the block's own C++ kernels (the FFN pair, the attention) may serve these layers:
    SparseLinear ones left on the C++ backend (not forced to torch; not swapped for dense twins)."""
    return all(isinstance(lin, SparseLinear) and lin.backend in _CPU_BACKENDS for lin in layers)


def activation_name(act) -> str | None:
    """The kernel epilogue's name for an activation module/function, or None when it has none."""
    if isinstance(act, str):
        return {"relu": "relu", "gelu": "gelu"}.get(act)
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", F.gelu) is not F.gelu:
        return None  # HF's python-erf GELU: same maths, but keep the exact module it asked for
    if isinstance(act, nn.ReLU):
        return "relu"
    return _ACTIVATION_FNS.get(act) or _HF_ACTIVATIONS.get(type(act).__name__)


def _linear_add_norm(lin: SparseLinear, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm(lin(x) + residual): in the AMX kernel's epilogue where it fits (bf16 BSR in tiles,
    no hook watching the layer), else lin(x) then add_norm."""
    if (not (lin._forward_hooks or lin._forward_pre_hooks) and _on_cpu_kernels(lin) and lin.activation == "none"
            and cpu.linear_add_norm_fits(x, lin.sparse_weight, residual, norm.weight, norm.bias)):
        ops.calls[("cpu", "linear-add-norm")] += 1
        return cpu.linear_add_norm(x, lin.sparse_weight, lin.bias, residual, norm.weight, norm.bias, norm.eps)
    return add_norm(lin(x), residual, norm)


def add_norm(t: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm(t + residual), t (tokens, H) a fresh output (overwritten): one C++ pass where it fits
    (cpu.add_layer_norm_) and autograd tracks none of the inputs (the pass has no backward), else
    torch's in-place add and layer_norm."""
    tracked = torch.is_grad_enabled() and any(
        u is not None and u.requires_grad for u in (t, residual, norm.weight, norm.bias))
    if not tracked and cpu.add_norm_fits(t, residual, norm.weight, norm.bias):
        ops.calls[("cpu", "add-layer-norm")] += 1
        return cpu.add_layer_norm_(t, residual, norm.weight, norm.bias, norm.eps)
    return F.layer_norm(t.add_(residual), norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class SparseEncoderLayer(nn.Module):
    """A transformer encoder block (batch-first) whose four linear maps are SparseLinear layers.

    qkv: (3H, H) stacked query/key/value; out: (H, H); ffn_in: (F, H) with the activation in its
    epilogue when `fuse_activation` (default: where that is faster, EPILOGUE_ACTIVATIONS), else
    applied after the kernel, in place; ffn_out: (H, F). norm1/norm2: LayerNorms.
    forward(x (B, S, H), attn_mask) -> (B, S, H); attn_mask: None, a bool mask (True = attend) or an
    additive float mask, broadcastable to (B, nh, S, S), as scaled_dot_product_attention takes it.
    """

    def __init__(self, qkv: SparseLinear, out: SparseLinear, ffn_in: SparseLinear, ffn_out: SparseLinear,
                 norm1: nn.LayerNorm, norm2: nn.LayerNorm, heads: int, *, norm_first: bool = False,
                 activation: str = "gelu", fuse_activation: bool | None = None):
        super().__init__()
        h = out.out_features
        shapes = {"qkv": (qkv, (3 * h, h)), "out": (out, (h, h)), "ffn_in": (ffn_in, (ffn_in.out_features, h)),
                  "ffn_out": (ffn_out, (h, ffn_in.out_features))}
        for name, (lin, shape) in shapes.items():
            if not isinstance(lin, SparseLinear):
                raise TypeError(f"SparseEncoderLayer: {name} must be a SparseLinear, got {type(lin).__name__}")
            if (lin.out_features, lin.in_features) != shape:
                raise ValueError(f"SparseEncoderLayer: {name} has shape {(lin.out_features, lin.in_features)}, "
                                 f"expected {shape} (hidden {h})")
        if heads < 1 or h % heads:
            raise ValueError(f"SparseEncoderLayer: hidden size {h} is not a multiple of heads={heads}")
        for name, norm in (("norm1", norm1), ("norm2", norm2)):
            if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (h,):
                raise ValueError(f"SparseEncoderLayer: {name} must be nn.LayerNorm({h}), got {norm}")
        self.qkv, self.out, self.ffn_in, self.ffn_out = qkv, out, ffn_in, ffn_out
        self.norm1, self.norm2 = norm1, norm2
        self.heads, self.hidden, self.norm_first = heads, h, norm_first
        if fuse_activation is None:
            fuse_activation = activation in EPILOGUE_ACTIVATIONS
        self.ffn_in.activation = activation if fuse_activation else None
        # The activation applied after the kernel when it is not fused (kept to measure the two).
        self.post_activation = None if fuse_activation else activation
        self.activation = activation

    def _context(self, x2: torch.Tensor, b: int, s: int, attn_mask) -> torch.Tensor:
        """The attention's output before the out projection, (B·S, H)."""
        nh, h = self.heads, self.hidden
        qkv = self.qkv(x2)
        if attn_mask is None and _on_cpu_kernels(self.qkv) and cpu.attention_fits(qkv, nh):
            # C++: no strided views, no transposed copy
            ops.calls[("cpu", "attention")] += 1
            return cpu.attention_cpu(qkv, b, s, nh)
        qkv = qkv.view(b, s, 3, nh, h // nh)                      # (B, S, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)            # each (B, nh, S, hs), strided views
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return ctx.transpose(1, 2).reshape(b * s, h)

    def _pair_fits(self, x2: torch.Tensor) -> bool:
        # Both FFN layers in a panelled CSR layout on the C++ kernels: one call, the hidden
        # activations kept in the kernels' packed layout (cpu.csr_pair_cpu).
        # (Not when a hook watches either layer: hooks see each layer's own call, e.g. the latency
        # profile's per-layer timing.)
        l1, l2 = self.ffn_in, self.ffn_out
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (l1, l2))
        return not hooked and _on_cpu_kernels(l1, l2) and cpu.pair_fits(x2, l1.sparse_weight, l2.sparse_weight)

    def _hidden(self, x2: torch.Tensor) -> torch.Tensor:
        f = self.ffn_in(x2)  # a fresh kernel output: the activation may overwrite it
        if self.post_activation is not None:
            _IN_PLACE[self.post_activation](f)
        return f

    def _pair(self, x2: torch.Tensor) -> torch.Tensor:
        l1, l2 = self.ffn_in, self.ffn_out
        ops.calls[("cpu", "csr-pair")] += 1
        return cpu.csr_pair_cpu(x2, l1.sparse_weight, l1.bias, self.activation, l2.sparse_weight, l2.bias,
                                l2.activation)

    def _ffn(self, x2: torch.Tensor) -> torch.Tensor:
        return self._pair(x2) if self._pair_fits(x2) else self.ffn_out(self._hidden(x2))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"SparseEncoderLayer: x must be (batch, seq, {self.hidden}), got {tuple(x.shape)}")
        b, s, h = x.shape
        x2 = x.reshape(b * s, h)
        n1, n2 = self.norm1, self.norm2
        if self.norm_first:
            a = self.out(self._context(F.layer_norm(x2, (h,), n1.weight, n1.bias, n1.eps), b, s, attn_mask)).add_(x2)
            y = self._ffn(F.layer_norm(a, (h,), n2.weight, n2.bias, n2.eps)).add_(a)
        else:
            a = _linear_add_norm(self.out, self._context(x2, b, s, attn_mask), x2, n1)
            y = add_norm(self._pair(a), a, n2) if self._pair_fits(a) else _linear_add_norm(
                self.ffn_out, self._hidden(a), a, n2)
        return y.view(b, s, h)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, heads={self.heads}, norm_first={self.norm_first}, activation={self.activation}"


# ----------------------------------------------------------------------------- building blocks

def _pruned_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The weight torch.nn.utils.prune would apply (weight_orig · mask), else the weight itself."""
    w = getattr(module, f"{name}_orig", getattr(module, name)).detach()
    mask = getattr(module, f"{name}_mask", None)
    return w if mask is None else w * (mask != 0)


def _dense_parts(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp32 dense weight, bias) of an nn.Linear or a SparseLinear."""
    if isinstance(lin, SparseLinear):
        w = lin.sparse_weight
        w = w.float() if isinstance(w, torch.Tensor) else w.to_dense(torch.float32)
        return w, lin.bias
    return _pruned_weight(lin), None if lin.bias is None else lin.bias.detach()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, opts: dict, like: SparseLinear | None = None
            ) -> SparseLinear:
    """A SparseLinear for a (pruned) dense weight. `like`: keep that layer's layout, block and dtype
    (a converted artifact's choice); else opts' format/blocksize/dtype (`auto`: the cost model's pick,
    dense layout below min_sparsity)."""
    if like is not None:
        fmt, w = formats.get(like.format), like.sparse_weight
        dtype = w.dtype
        block = fmt.blocksize(w)
        if block is not None and (weight.shape[0] % block[0] or weight.shape[1] % block[1]):
            block = detect_blocksize(weight != 0) or (1, 1)  # a stacked weight keeps its block's shape
        bias_dtype = like.bias.dtype if like.bias is not None else torch.float32
        built = fmt.build(weight.to(dtype), None, block if fmt.blocked else None)
        return SparseLinear(built, None if bias is None else bias.to(bias_dtype), backend=like.backend)
    fmt = opts["format"]
    sparsity = 1.0 - float((weight != 0).float().mean()) if weight.numel() else 0.0
    if sparsity < opts["min_sparsity"]:
        fmt = "dense"
    proxy = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        proxy.weight.copy_(weight)
        if bias is not None:
            proxy.bias.copy_(bias)
    return SparseLinear.from_linear(proxy, fmt, opts["blocksize"], dtype=opts["dtype"], batch=opts["batch"])


def _reuse_or_build(lin: nn.Module, opts: dict) -> SparseLinear:
    if isinstance(lin, SparseLinear):
        lin.activation = None
        return lin
    return _linear(*_dense_parts(lin), opts)


def _stacked_qkv(parts: list[nn.Module] | None, weight=None, bias=None, opts: dict | None = None) -> SparseLinear:
    """One SparseLinear for Q, K and V: from three linear layers (stacked), or a stacked weight."""
    if parts is not None:
        dense = [_dense_parts(p) for p in parts]
        weight = torch.cat([w for w, _ in dense])
        biases = [b for _, b in dense]
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(w.shape[0]) if b is None else b.float() for (w, _), b in zip(dense, biases)])
        sparse = [p for p in parts if isinstance(p, SparseLinear)]
        if len(sparse) == 3 and len({(p.format, p.sparse_weight.dtype) for p in sparse}) == 1:
            return _linear(weight, bias, opts, like=sparse[0])
        if sparse:  # per-layer choices differ (format="auto" at convert): choose for the stack
            opts = {**opts, "format": "auto", "dtype": sparse[0].sparse_weight.dtype}
    return _linear(weight, bias, opts)


def _layer_norm(norm: nn.Module, h: int) -> nn.LayerNorm:
    if isinstance(norm, nn.LayerNorm):
        return norm
    raise TypeError(f"engine.transformer: expected nn.LayerNorm({h}), got {type(norm).__name__}")


def from_torch_layer(layer: nn.TransformerEncoderLayer, opts: dict) -> SparseEncoderLayer | None:
    """nn.TransformerEncoderLayer (batch_first, self-attention of one embed dim, relu/gelu) -> the
    fast block; None when the layer is outside what it runs (left as it is)."""
    attn = layer.self_attn
    act = activation_name(layer.activation)
    if not (attn._qkv_same_embed_dim and act is not None and attn.bias_k is None and not attn.add_zero_attn):
        return None
    in_bias = None if attn.in_proj_bias is None else attn.in_proj_bias.detach()
    qkv = _stacked_qkv(None, _pruned_weight(attn, "in_proj_weight"), in_bias, opts)
    fast = SparseEncoderLayer(qkv, _reuse_or_build(attn.out_proj, opts), _reuse_or_build(layer.linear1, opts),
                              _reuse_or_build(layer.linear2, opts), layer.norm1, layer.norm2, attn.num_heads,
                              norm_first=layer.norm_first, activation=act)
    return TorchEncoderLayer(fast, batch_first=attn.batch_first)


def is_bert_layer(module: nn.Module) -> bool:
    """The Hugging Face BertLayer parameter layout (also the bert family's Layer), by structure."""
    try:
        module.attention.self.query, module.attention.output.LayerNorm, module.intermediate.dense
        module.output.dense, module.output.LayerNorm
    except AttributeError:
        return False
    return not getattr(module, "is_decoder", False) and not hasattr(module, "crossattention")


def _bert_heads(module: nn.Module) -> int:
    sa = module.attention.self
    return int(getattr(sa, "heads", None) or getattr(sa, "num_attention_heads"))


def _bert_activation(module: nn.Module) -> str | None:
    inter = module.intermediate
    if isinstance(inter.dense, SparseLinear) and inter.dense.activation != "none":
        return inter.dense.activation  # fused already (the family's prepare_runtime)
    return activation_name(getattr(inter, "act", None) or getattr(inter, "intermediate_act_fn", None))


def from_bert_layer(module: nn.Module, opts: dict) -> SparseEncoderLayer | None:
    """A BertLayer-shaped block (HF's or the bert family's) -> the fast block (post-LN); None when
    its activation has no kernel epilogue."""
    act = _bert_activation(module)
    if act is None:
        return None
    sa, h = module.attention.self, module.attention.output.LayerNorm.normalized_shape[0]
    qkv = _stacked_qkv([sa.query, sa.key, sa.value], opts=opts)
    return SparseEncoderLayer(qkv, _reuse_or_build(module.attention.output.dense, opts),
                              _reuse_or_build(module.intermediate.dense, opts),
                              _reuse_or_build(module.output.dense, opts),
                              _layer_norm(module.attention.output.LayerNorm, h),
                              _layer_norm(module.output.LayerNorm, h), _bert_heads(module), activation=act)


class TorchEncoderLayer(nn.Module):
    """The fast block behind nn.TransformerEncoderLayer's call signature (src, src_mask,
    src_key_padding_mask, is_causal); bool masks mean True = masked, as torch's do. src is
    (B, S, H), or (S, B, H) when the layer it replaces was not batch_first."""

    def __init__(self, block: SparseEncoderLayer, batch_first: bool = True):
        super().__init__()
        self.block = block
        self.batch_first = batch_first
        # nn.TransformerEncoder.forward reads layers[0].self_attn.batch_first before anything else.
        self.self_attn = SimpleNamespace(batch_first=batch_first)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        if self.batch_first:
            return self._run(src, src_mask, src_key_padding_mask, is_causal)
        return self._run(src.transpose(0, 1), src_mask, src_key_padding_mask, is_causal).transpose(0, 1)

    def _run(self, src, src_mask, src_key_padding_mask, is_causal):
        b, s, _ = src.shape
        mask = None
        if src_mask is not None:
            m = _additive(src_mask, src.dtype)
            mask = m.view(b, -1, s, s) if m.dim() == 3 else m
        elif is_causal:
            mask = torch.full((s, s), float("-inf"), dtype=src.dtype, device=src.device).triu_(1)
        if src_key_padding_mask is not None:
            pad = _additive(src_key_padding_mask, src.dtype)[:, None, None, :]  # (B, 1, 1, S)
            mask = pad if mask is None else mask + pad
        return self.block(src, mask)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class BertLayerAdapter(nn.Module):
    """The fast block behind HF BertLayer's call (hidden_states, attention_mask, ...): the mask HF
    built for its sdpa/eager attention (bool True = attend, or additive) goes to SDPA as it is."""

    def __init__(self, block: SparseEncoderLayer):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        return self.block(hidden_states, attention_mask)


def convert_block(module: nn.Module, opts: dict, hf: bool = False) -> nn.Module | None:
    """The fast replacement of one encoder block, or None when it is not one the fast path runs."""
    if isinstance(module, nn.TransformerEncoderLayer):
        return from_torch_layer(module, opts)
    if is_bert_layer(module):
        fast = from_bert_layer(module, opts)
        return None if fast is None else (BertLayerAdapter(fast) if hf else fast)
    return None


def sparsify(model: nn.Module, format: str = "auto", blocksize=None, *, dtype: torch.dtype | None = None,
             skip: tuple[str, ...] = (), min_sparsity: float = 0.0, fuse_activations: bool = True,
             batch: int = 8, blocks: bool = True) -> nn.Module:
    """engine.sparsify: swaps (in place) every transformer encoder block for a SparseEncoderLayer
    (nn.TransformerEncoderLayer, batch_first, relu/gelu; HF BertLayer; the bert family's Layer),
    then every remaining nn.Linear for a SparseLinear (engine.modules.sparsify; same arguments).
    Blocks take the same format/blocksize/dtype; Q, K and V become one stacked layer. `skip`
    names leave a block (or a linear layer) untouched; blocks=False swaps only linear layers."""
    if format not in FORMATS:
        raise ValueError(f"sparsify: unknown format {format!r}; expected one of {FORMATS}")
    opts = dict(format=format, blocksize=blocksize, dtype=dtype, min_sparsity=min_sparsity, batch=batch)
    if blocks:
        for name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                qual = f"{name}.{child_name}" if name else child_name
                if qual in skip or any(qual.startswith(f"{s}.") for s in skip):
                    continue
                hf = type(child).__module__.startswith("transformers.")
                fast = convert_block(child, opts, hf=hf)
                if fast is not None:
                    setattr(parent, child_name, fast)
        for m in model.modules():
            if isinstance(m, nn.TransformerEncoder) and isinstance(m.layers[0], TorchEncoderLayer):
                m.use_nested_tensor = False  # its nested-tensor path reads the swapped layer's weights
    # A MultiheadAttention the fast path did not take reads out_proj.weight itself: leave it nn.Linear.
    skip = (*skip, *(f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)))
    return sparsify_linears(model, format, blocksize, dtype=dtype, skip=skip, min_sparsity=min_sparsity,
                            fuse_activations=fuse_activations, batch=batch)
