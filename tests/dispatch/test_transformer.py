"""The transformer-block fast path (engine.transformer) against the plain-torch reference:
nn.TransformerEncoder (post-/pre-LN, relu/gelu/gelu-tanh, batch-first or not, padding and causal
masks), Hugging Face's BertModel (sdpa and eager masks), odd shapes, size-0 batches, bf16 weights.
Every test also proves the sparse kernels ran (engine.ops.calls), so a fallback fails it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import engine
from engine import ops, transformer
from engine.convert import KERNEL_TOL, STORAGE_TOL
from engine.cpu import available as cpu_available
from engine.modules import SparseLinear, choose_layout
from engine.transformer import EPILOGUE_ACTIVATIONS, SparseEncoderLayer, TorchEncoderLayer, sparsify

pytestmark = pytest.mark.skipif(not cpu_available(), reason="the C++ extension engine._C is not built")

# Odd sizes on purpose: hidden 40 = 5 heads of 8, FFN 72, sequence 7.
H, HEADS, FFN, SEQ = 40, 5, 72, 7


def prune_(model: nn.Module, sparsity: float, gen: torch.Generator) -> nn.Module:
    """Zeroes `sparsity` of every 2-D weight (8x8 tiles, so BSR has real blocks to find)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and p.shape[0] % 8 == 0 and p.shape[1] % 8 == 0:
                keep = torch.rand(p.shape[0] // 8, p.shape[1] // 8, generator=gen) >= sparsity
                p.mul_(keep.repeat_interleave(8, 0).repeat_interleave(8, 1))
    return model


def torch_encoder(norm_first: bool, activation, batch_first: bool = True, layers: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(H, HEADS, FFN, dropout=0.0, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    return prune_(enc, 0.6, gen)


def padding(batch: int) -> torch.Tensor:
    pad = torch.zeros(batch, SEQ, dtype=torch.bool)  # True = padded key
    pad[1:, 4:] = True
    pad[2:, 2:] = True
    return pad


def kernel_calls() -> int:
    """Calls of the C++ linear-layer kernels (not the attention / add + LayerNorm ones)."""
    return sum(n for (backend, op), n in ops.calls.items()
               if backend == "cpu" and op not in ("attention", "add-layer-norm"))


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_torch_encoder_matches_reference(fmt, norm_first, act):
    activation = nn.GELU(approximate="tanh") if act == "gelu_tanh" else act
    ref = torch_encoder(norm_first, activation)
    fast = sparsify(copy.deepcopy(ref), format=fmt)
    assert all(isinstance(layer, TorchEncoderLayer) for layer in fast.layers)
    block = fast.layers[0].block
    assert {lin.format for lin in block.children() if isinstance(lin, SparseLinear)} == {fmt}
    fused = act in EPILOGUE_ACTIVATIONS  # the others run after the kernel (faster, see the module)
    assert (block.ffn_in.activation, block.post_activation) == ((act, None) if fused else ("none", act))
    x = torch.randn(4, SEQ, H)
    pad = padding(4)
    ops.calls.clear()
    with torch.no_grad():
        y = fast(x, src_key_padding_mask=pad)
        expected = ref(x.double().float(), src_key_padding_mask=pad)
    assert kernel_calls() == 4 * len(fast.layers)  # QKV, out, FFN in, FFN out: one call each
    torch.testing.assert_close(y, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("batch,seq", [(2, 16), (3, 11)])
def test_ffn_is_one_pair_call_where_both_layers_are_panel_major(batch, seq):
    """Hidden 264 and FFN 520 (wider than two 128-input panels), 40 % dense CSR: where the panel-major
    layout serves both FFN layers at this many tokens (256-bit kernels; 512-bit at a multiple of 16), the FFN
    runs as one csr_pair call, the hidden activations kept packed, and the block still matches torch."""
    from engine import cpu
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(264, 8, 520, dropout=0.0, activation="gelu", batch_first=True)
    ref = prune_(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), 0.6, torch.Generator().manual_seed(5))
    fast = sparsify(copy.deepcopy(ref), format="csr")
    tokens = batch * seq
    pairs = cpu.isa() in ("avx2", "avx512") and (cpu.csr_bits() == 256 or tokens % 16 == 0)
    x = torch.randn(batch, seq, 264)
    ops.calls.clear()
    with torch.no_grad():
        y = fast(x)
        expected = ref(x)
    assert ops.calls[("cpu", "csr-pair")] == (2 if pairs else 0)
    assert kernel_calls() == (3 if pairs else 4) * 2
    torch.testing.assert_close(y, expected, atol=2e-5, rtol=2e-5)
    fast.layers[0].block.ffn_out.backend = "torch"  # one FFN layer off the C++ kernels: no pair there
    seen = []  # and a hooked layer runs its own call, so the hook sees it (the latency profile times so)
    fast.layers[1].block.ffn_in.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    ops.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, atol=2e-5, rtol=2e-5)
    assert ops.calls[("cpu", "csr-pair")] == 0
    assert seen == [(tokens, 520)]


def test_unmasked_attention_runs_on_the_cpp_kernel():
    """No mask: attention straight from the QKV output on the AVX2 / AVX-512 kernels (head size 8);
    on the portable ISA it stays on scaled_dot_product_attention. Both match torch."""
    from engine import cpu
    ref = torch_encoder(False, "gelu")
    fast = sparsify(copy.deepcopy(ref), format="csr")
    x = torch.randn(3, SEQ, H)
    before = cpu.isa()
    try:
        for isa in ("avx2", "portable"):
            if isa == "avx2" and not cpu._C.cpu_has_avx2():
                continue
            cpu.set_isa(isa)
            ops.calls.clear()
            with torch.no_grad():
                torch.testing.assert_close(fast(x), ref(x), atol=2e-5, rtol=2e-5)
            assert ops.calls[("cpu", "attention")] == (2 if isa == "avx2" else 0)
            assert ops.calls[("cpu", "add-layer-norm")] == (4 if isa == "avx2" else 0)  # 2 post-LN layers
    finally:
        cpu.set_isa(before)
    for layer in fast.layers:  # a QKV projection forced onto torch takes the attention with it
        layer.block.qkv.backend = "torch"
    ops.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), atol=2e-5, rtol=2e-5)
    assert ops.calls[("cpu", "attention")] == 0


@pytest.mark.parametrize("batch_first", [True, False])
def test_causal_and_float_masks(batch_first):
    ref = torch_encoder(False, "gelu", batch_first=batch_first)
    fast = sparsify(copy.deepcopy(ref), format="csr")
    x = torch.randn(3, SEQ, H) if batch_first else torch.randn(SEQ, 3, H)
    causal = nn.Transformer.generate_square_subsequent_mask(SEQ)  # float, -inf above the diagonal
    with torch.no_grad():
        for kwargs in (dict(mask=causal, is_causal=True), dict(mask=causal.isinf()),
                       dict(mask=causal.isinf(), src_key_padding_mask=padding(3))):
            torch.testing.assert_close(fast(x, **kwargs), ref(x, **kwargs), atol=2e-5, rtol=2e-5)


def test_size_zero_batch():
    ref = torch_encoder(True, "relu")
    fast = sparsify(copy.deepcopy(ref), format="bsr")
    x = torch.randn(0, SEQ, H)
    with torch.no_grad():
        y = fast(x)
    assert y.shape == (0, SEQ, H)
    torch.testing.assert_close(y, ref(x))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_bf16_weights(fmt):
    """bf16 storage: within the artifact rule vs the fp32 model, and the kernel tolerance vs the same
    model with its weights rounded to bf16 (fp32 accumulation: rounding is the only error)."""
    ref = torch_encoder(False, "gelu")
    fast = sparsify(copy.deepcopy(ref), format=fmt, dtype=torch.bfloat16)
    assert {lin.sparse_weight.dtype for lin in fast.modules() if isinstance(lin, SparseLinear)} == {torch.bfloat16}
    rounded = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2:
                p.copy_(p.to(torch.bfloat16).float())
        for m in rounded.modules():  # biases: SparseLinear.from_linear stores them in bf16 as well
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(m.bias.to(torch.bfloat16).float())
        rounded.layers[0].self_attn.in_proj_bias.copy_(rounded.layers[0].self_attn.in_proj_bias.bfloat16().float())
        rounded.layers[1].self_attn.in_proj_bias.copy_(rounded.layers[1].self_attn.in_proj_bias.bfloat16().float())
    x, pad = torch.randn(3, SEQ, H), padding(3)
    with torch.no_grad():
        y = fast(x, src_key_padding_mask=pad)
        keep = ~pad[..., None]  # padded query rows are compared too: they attend to real keys
        assert rel_err(y * keep, ref(x, src_key_padding_mask=pad) * keep) <= STORAGE_TOL["bf16"]
        assert rel_err(y, rounded(x, src_key_padding_mask=pad)) <= 10 * KERNEL_TOL


def test_bf16_model_on_amx_kernels_end_to_end():
    """The engine model cast to bf16, as a user casts the dense one: the projections on the AMX BSR
    kernel, the unmasked attention on the AMX attention kernel (head size 32), residual + LayerNorm
    inside the out / FFN-out kernels; its error against the fp32 model no larger than dense bf16 torch's (to within
    a rounding's worth)."""
    from engine import cpu
    if not cpu.bf16_support()["amx"]:
        pytest.skip(f"amx cannot run here: {cpu.bf16_support()['amx_reason']}")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 2, 96, dropout=0.0, activation="gelu", batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():  # 50 % of the 16x32 tiles of every weight zero
        for p in ref.parameters():
            if p.dim() == 2:
                keep = torch.rand(p.shape[0] // 16, p.shape[1] // 32) >= 0.5
                p.mul_(keep.repeat_interleave(16, 0).repeat_interleave(32, 1))
    fast = sparsify(copy.deepcopy(ref), format="bsr", blocksize=(16, 32)).to(torch.bfloat16)
    x = torch.randn(3, 37, 64)
    ops.calls.clear()
    with torch.no_grad():
        y = fast(x.bfloat16())
        expected = ref(x)
        dense_bf16 = copy.deepcopy(ref).to(torch.bfloat16)(x.bfloat16())
    assert y.dtype is torch.bfloat16
    # out and FFN-out projections with residual + LayerNorm inside the AMX kernel (no separate pass)
    assert ops.calls[("cpu", "attention")] == 2 and ops.calls[("cpu", "linear-add-norm")] == 4
    assert ops.calls[("cpu", "add-layer-norm")] == 0
    assert cpu.last_bf16_kernel() == "amx"  # the last projection (FFN out) on the AMX BSR kernel
    ours, theirs = rel_err(y.float(), expected), rel_err(dense_bf16.float(), expected)
    assert ours <= 1.5 * theirs + 2.0 ** -9, (ours, theirs)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_epilogue_activation_equals_activation_after(act):
    activation = nn.GELU(approximate="tanh") if act == "gelu_tanh" else act
    block = sparsify(torch_encoder(False, activation), format="csr").layers[0].block
    x = torch.randn(2, SEQ, H)
    results = []
    for fuse in (True, False):
        layer = SparseEncoderLayer(block.qkv, block.out, block.ffn_in, block.ffn_out, block.norm1, block.norm2,
                                   HEADS, activation=act, fuse_activation=fuse)
        assert layer.ffn_in.activation == (act if fuse else "none")
        assert layer.post_activation == (None if fuse else act)
        with torch.no_grad():
            results.append(layer(x))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_hf_bert_model_matches_transformers():
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (3, SEQ), generator=gen)
    mask = (~padding(3)).long()
    for impl in ("sdpa", "eager"):
        config = transformers.BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                                         intermediate_size=FFN, max_position_embeddings=16, hidden_act="gelu",
                                         attn_implementation=impl)
        torch.manual_seed(3)
        ref = prune_(transformers.BertModel(config).eval(), 0.6, gen)
        assert ref.config._attn_implementation == impl
        fast = engine.sparsify(copy.deepcopy(ref), format="bsr", skip=("pooler.dense",))
        assert all(isinstance(layer.block, SparseEncoderLayer) for layer in fast.encoder.layer)
        ops.calls.clear()
        with torch.no_grad():
            y = fast(input_ids=ids, attention_mask=mask).last_hidden_state
            expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert kernel_calls() == 4 * config.num_hidden_layers
        torch.testing.assert_close(y, expected, atol=2e-5, rtol=2e-5)


def test_unsupported_layers_are_left_alone():
    """A layer outside the fast path keeps torch's own modules, attention projection included."""
    enc = torch_encoder(False, lambda t: torch.tanh(t))  # no kernel epilogue for tanh
    ref = copy.deepcopy(enc)
    sparsify(enc, format="csr")
    assert isinstance(enc.layers[0], nn.TransformerEncoderLayer)
    assert isinstance(enc.layers[0].self_attn.out_proj, nn.Linear)
    assert isinstance(enc.layers[0].linear1, SparseLinear)
    x = torch.randn(2, SEQ, H)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x), atol=2e-5, rtol=2e-5)


def test_bad_shapes_are_refused():
    block = sparsify(torch_encoder(False, "relu"), format="csr").layers[0].block
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, 40\), got \(2, 7, 41\)"):
        block(torch.randn(2, SEQ, H + 1))
    with pytest.raises(ValueError, match="qkv has shape"):
        SparseEncoderLayer(block.out, block.out, block.ffn_in, block.ffn_out, block.norm1, block.norm2, HEADS)
    with pytest.raises(ValueError, match="not a multiple of heads=3"):
        SparseEncoderLayer(block.qkv, block.out, block.ffn_in, block.ffn_out, block.norm1, block.norm2, 3)


def test_bert_layer_with_mixed_qkv_layouts():
    """Q, K and V converted to different layouts (format="auto" decides per layer): the stacked
    layer gets one layout chosen for the stack, and the block still matches the layer it replaces."""
    from engine.models import bert
    config = dict(vocab_size=50, hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS,
                  intermediate_size=FFN, hidden_act="gelu", max_position_embeddings=16, type_vocab_size=2,
                  layer_norm_eps=1e-12, pad_token_id=0)
    torch.manual_seed(4)
    ref = prune_(bert.build(config).eval(), 0.6, torch.Generator().manual_seed(4))
    layer = copy.deepcopy(ref.encoder.layer[0])
    sa = layer.attention.self
    sa.query = SparseLinear.from_linear(sa.query, "csr")
    sa.key = SparseLinear.from_linear(sa.key, "bsr", (8, 8))
    fast = transformer.from_bert_layer(layer, dict(format="dense", blocksize=None, dtype=None,
                                                   min_sparsity=0.0, batch=8))
    ref_sa = ref.encoder.layer[0].attention.self
    stacked = torch.cat([ref_sa.query.weight, ref_sa.key.weight, ref_sa.value.weight]).detach()
    assert fast.qkv.format == choose_layout(stacked)[0]  # chosen for the stack, not the "dense" for leftovers
    x = torch.randn(2, SEQ, H)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref.encoder.layer[0](x, None), atol=2e-5, rtol=2e-5)
