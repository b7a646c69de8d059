"""Configuration of the hybrid model: Lightning linear attention and InfLLM-V2 sparse attention layers.

Copied verbatim into every exported model folder; imports only transformers.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# transformers validates `layer_types` against its own vocabulary, so the two kinds use its names: Lightning layers are
# "linear_attention"; the softmax-attention layers ("full_attention") run as InfLLM-V2 sparse attention beyond
# `sparse_dense_len`. The short names "lightning" and "sparse" are accepted on input.
LIGHTNING = "linear_attention"
SPARSE = "full_attention"
LAYER_KINDS = (LIGHTNING, SPARSE)
LAYER_ALIASES = {"lightning": LIGHTNING, "linear": LIGHTNING, "sparse": SPARSE, "attention": SPARSE}
DECAY_SCHEDULES = ("sala", "layerwise")
LIGHTNING_KV_HEADS = ("query", "source")
SPARSE_SELECTIONS = ("token", "block")


class HybridConfig(PretrainedConfig):
    """Shape of the source model plus the hybrid's per-layer choices.

    `layer_types[i]` is "linear_attention" (Lightning) or "full_attention" (sparse). Lightning options follow MiniCPM-SALA (fixed ALiBi-slope decay, the
    same in every layer, unless `lightning_decay="layerwise"`); sparse options are InfLLM-V2's defaults. With `hype`
    the sparse layers use no positional encoding (NoPE) and the Lightning layers keep RoPE; without it both use RoPE.
    `lightning_kv_heads`: "query" (SALA: the source's K/V projections expanded in the weights to one head per query
    head) or "source" (the Lightning layers keep the source's K/V heads and share each among its group of query heads
    at run time, as GQA does: the same function at conversion, two fewer full-width projections per layer).
    `lightning_window` (0: off) and `lightning_sinks`: each Lightning layer also runs the source's softmax attention
    (its q/k projections and RoPE, no q/k norm unless the source has one) over each sequence's first `lightning_sinks`
    and last `lightning_window` tokens, added to the recurrent branch's normed, gated output before o_proj. A fresh
    conversion starts the recurrent branch at zero, so it computes the source with its attention cut to that window
    (SmolLM2 with 256 + 4: 1.04x the held-out perplexity untrained, bench/results/retention.md); the recurrent branch
    learns what lies further back. The cache holds the sinks and a ring of the last `lightning_window` keys per layer.
    `lightning_sink_reach` (0: off; else at least twice the window): the window branch reads a sink that lies further
    back than this as if it lay this far back (RoPE at that distance), so that past the source's context (convert sets
    it there) the branch sees no distance the source was not trained on; up to it the function is unchanged.
    Sparse selection: `sparse_selection="block"` (default: the queries of one `sparse_select_tokens`-aligned group, i.e.
    one 64-token block, share a selection, as block-sparse kernels need for speed; prefill on the GPU is 10x faster than
    per-token selection, bench/results/model-speed.md) or `"token"` (exact per-token selection; a decode step is always
    per token, so only "token" makes a cached generation reproduce the full forward bit for bit beyond
    `sparse_dense_len`);
    `sparse_coarse_normalizer` (default true, as in InfLLM-V2's kernels) takes the selection softmax's normaliser from
    coarse keys (4x the compression window and stride) instead of every compressed key: 3-5% faster prefill at
    128K-256K on the Llama-3-8B shape, and the same held-out loss within 0.001 nats on SmolLM2 made all-sparse at 8K
    tokens (bench/results/kernels-sparse.md); false gives the exact normaliser. Their definitions:
    kernels/sparse_reference.py.
    `prefill_chunk_size`: inference with a cache feeds longer inputs through the model in chunks of this many tokens
    (None: one pass), so a long prompt never materialises a full-length MLP activation.
    `fused_elementwise`: on CUDA, without autograd, run the small elementwise pieces (norms, residual add + norm,
    silu * up, sparse gates) as torch.compile'd fused kernels (the same values; 128K prefill of a Llama-3-8B shape
    5.33 -> 3.97 s on an H100, bench/results/model-speed.md); false keeps plain PyTorch there. It can be changed at
    run time (`model.config.fused_elementwise = False`). The Lightning layers' q/k norm + RoPE and output norm + gate
    are Triton kernels on CUDA whatever this says (training included; kernels/norm_rope_triton.py, norm_gate_triton.py).
    `decode_cuda_graphs`: on CUDA, decode steps of `HybridForCausalLM` (one new token per sequence after a filled
    cache, no autograd) replay their fixed-shape stretches from CUDA graphs, the sparse layers' attention running
    between them (decode_graphs.py; the same logits as without); false runs every step as plain PyTorch. It can be
    changed at run time (`model.config.decode_cuda_graphs = False`).
    """

    model_type = "hybridize"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        layer_types: list[str] | None = None,
        hype: bool = True,
        output_gates: bool = True,
        lightning_decay: str = "sala",
        lightning_kv_heads: str = "query",
        lightning_chunk_size: int = 64,
        lightning_window: int = 0,
        lightning_sinks: int = 4,
        lightning_sink_reach: int = 0,
        sparse_dense_len: int = 8192,
        sparse_block_size: int = 64,
        sparse_compress_kernel: int = 32,
        sparse_compress_stride: int = 16,
        sparse_topk: int = 96,
        sparse_init_blocks: int = 1,
        sparse_local_blocks: int = 32,
        sparse_query_log_scale: float | None = None,
        sparse_selection: str = "block",
        sparse_select_tokens: int = 64,
        sparse_coarse_normalizer: bool = True,
        prefill_chunk_size: int | None = 16384,
        fused_elementwise: bool = True,
        decode_cuda_graphs: bool = True,
        source_model_type: str | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.rope_parameters.setdefault("rope_type", "default")
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        if layer_types is None:
            layer_types = default_layer_types(num_hidden_layers)
        self.layer_types = [LAYER_ALIASES.get(t, t) for t in layer_types]
        self.hype = hype
        self.output_gates = output_gates
        self.lightning_decay = lightning_decay
        self.lightning_kv_heads = lightning_kv_heads
        self.lightning_chunk_size = lightning_chunk_size
        self.lightning_window = lightning_window
        self.lightning_sinks = lightning_sinks
        self.lightning_sink_reach = lightning_sink_reach
        self.sparse_dense_len = sparse_dense_len
        self.sparse_block_size = sparse_block_size
        self.sparse_compress_kernel = sparse_compress_kernel
        self.sparse_compress_stride = sparse_compress_stride
        self.sparse_topk = sparse_topk
        self.sparse_init_blocks = sparse_init_blocks
        self.sparse_local_blocks = sparse_local_blocks
        self.sparse_query_log_scale = sparse_query_log_scale
        self.sparse_selection = sparse_selection
        self.sparse_select_tokens = sparse_select_tokens
        self.sparse_coarse_normalizer = sparse_coarse_normalizer
        self.prefill_chunk_size = prefill_chunk_size
        self.fused_elementwise = fused_elementwise
        self.decode_cuda_graphs = decode_cuda_graphs
        self.source_model_type = source_model_type
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_KINDS})
        if bad:
            raise ValueError(f"layer_types may contain only {LAYER_KINDS}, got {bad}")
        if self.lightning_decay not in DECAY_SCHEDULES:
            raise ValueError(f"lightning_decay must be one of {DECAY_SCHEDULES}, got {self.lightning_decay!r}")
        if self.lightning_kv_heads not in LIGHTNING_KV_HEADS:
            raise ValueError(f"lightning_kv_heads must be one of {LIGHTNING_KV_HEADS}, got {self.lightning_kv_heads!r}")
        w, s = self.lightning_window, self.lightning_sinks
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ValueError(f"lightning_window must be a non-negative integer (0: off), got {w!r}")
        if not isinstance(s, int) or isinstance(s, bool) or s < 0 or (w and s > w):
            raise ValueError(f"lightning_sinks must be an integer from 0 to lightning_window ({w}), got {s!r}")
        r = self.lightning_sink_reach
        if not isinstance(r, int) or isinstance(r, bool) or r < 0 or (r and r < 2 * w):
            raise ValueError(f"lightning_sink_reach must be 0 (off) or an integer of at least twice lightning_window "
                             f"({2 * w}), got {r!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.sparse_init_blocks + self.sparse_local_blocks > self.sparse_topk:
            raise ValueError("sparse_topk must cover sparse_init_blocks + sparse_local_blocks")
        if self.prefill_chunk_size is not None and (not isinstance(self.prefill_chunk_size, int)
                                                    or self.prefill_chunk_size < 1):
            raise ValueError(f"prefill_chunk_size must be a positive integer or null, got {self.prefill_chunk_size!r}")
        if self.sparse_local_blocks < 1:
            raise ValueError("sparse_local_blocks must be at least 1 (the query's own block)")
        if self.sparse_block_size % self.sparse_compress_stride:
            raise ValueError("sparse_block_size must be a multiple of sparse_compress_stride")
        if self.sparse_selection not in SPARSE_SELECTIONS:
            raise ValueError(f"sparse_selection must be one of {SPARSE_SELECTIONS}, got {self.sparse_selection!r}")
        n = self.sparse_select_tokens
        if not isinstance(n, int) or n < 16 or n & (n - 1):
            raise ValueError(f"sparse_select_tokens must be a power of two >= 16, got {n!r}")
        if not isinstance(self.fused_elementwise, bool):
            raise ValueError(f"fused_elementwise must be true or false, got {self.fused_elementwise!r}")
        if not isinstance(self.decode_cuda_graphs, bool):
            raise ValueError(f"decode_cuda_graphs must be true or false, got {self.decode_cuda_graphs!r}")
        if not isinstance(self.sparse_coarse_normalizer, bool):
            raise ValueError(f"sparse_coarse_normalizer must be true or false, got {self.sparse_coarse_normalizer!r}")
        if self.sparse_coarse_normalizer and self.sparse_compress_kernel % self.sparse_compress_stride:
            raise ValueError("sparse_coarse_normalizer needs sparse_compress_kernel to be a multiple of "
                             "sparse_compress_stride (the coarse keys are built from non-overlapping windows); "
                             "set sparse_coarse_normalizer: false for the exact normaliser")

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == SPARSE]

    @property
    def sparse_coarse_window(self) -> tuple[int, int]:
        """(kernel, stride) of the coarse keys of `sparse_coarse_normalizer`: 4x the compression window and stride."""
        return 4 * self.sparse_compress_kernel, 4 * self.sparse_compress_stride


def default_layer_types(num_layers: int) -> list[str]:
    """Every fourth layer sparse (the last of each group of four), the rest Lightning."""
    return [SPARSE if i % 4 == 3 else LIGHTNING for i in range(num_layers)]


__all__ = ["HybridConfig", "LIGHTNING", "SPARSE", "LAYER_KINDS", "default_layer_types"]
