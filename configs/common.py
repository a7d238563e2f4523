"""Shared defaults for every effitrans config. Each config file starts from these groups and changes what
it needs. Every key is described here, where it is declared; effitrans/config_validation.py says what
values are allowed.
"""

import ml_collections


def model(**overrides) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.name = "causal_lm"  # causal_lm | encoder_classifier | encoder_embedding
    m.vocab_size = 261  # byte-level: 256 bytes + PAD, BOS, EOS, CLS, MASK (effitrans.data.tokenizer)
    m.d_model = 128  # residual width D
    m.num_layers = 2
    m.num_heads = 4  # query heads N
    m.num_kv_heads = 4  # key/value heads K: = N is MHA, 1 is MQA, a divisor of N is GQA
    m.head_dim = 32  # H
    m.ffn_width = ml_collections.FieldReference(384, field_type=object)  # GLU width F: an int, or one per layer
    m.ffn_activation = "silu"  # silu (SwiGLU) | gelu | relu
    m.tie_embeddings = True  # LM head shares the embedding table
    m.rope_base = 10000.0  # RoPE wavelength base; None disables RoPE
    m.rope_layout = "half"  # half (rotate-half, HF Llama) | interleaved (adjacent pairs, GGUF / Meta)
    m.norm_eps = 1e-6  # RMSNorm epsilon
    m.dtype = "float32"  # compute dtype of activations (params stay float32): float32 | bfloat16
    m.attention = ml_collections.ConfigDict()
    m.attention.kind = "dense"  # attention family (effitrans.attention.ATTENTION_FAMILIES)
    m.attention.impl = "auto"  # kernel: reference | xla | pallas | auto (pallas on TPU/GPU, xla on CPU)
    m.attention.block_q = ml_collections.FieldReference(None, field_type=int)  # kernel query block (None: auto)
    m.attention.block_k = ml_collections.FieldReference(None, field_type=int)  # kernel key block (None: auto)
    _declare_family_keys(m.attention)
    m.update(overrides)
    return m


def _declare_family_keys(attention: ml_collections.ConfigDict) -> None:
    """Every family's own keys, declared None so any of them can be set from the command line, e.g.
    `--config.model.attention.kind=sliding_window --config.model.attention.window_left=128`.

    None means the family's default (effitrans/attention/sparse_families.DEFAULTS; latent: its builder).
    Only the keys of the chosen kind may be set: config validation rejects e.g. window_left with
    kind='dense' instead of silently ignoring it. Meanings: docs/attention_families.md.
    """

    def declare(name, field_type):
        attention[name] = ml_collections.FieldReference(None, field_type=field_type)

    # latent (MLA)
    for name in ("kv_lora_rank", "qk_rope_head_dim", "q_lora_rank", "v_head_dim", "yarn_original_max_len"):
        declare(name, int)
    declare("mla_path", str)  # naive | absorbed | auto
    for name in ("yarn_factor", "yarn_beta_fast", "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim"):
        declare(name, float)
    # sliding_window (Longformer)
    for name in ("window_left", "window_right", "num_global"):
        declare(name, int)
    # sparse_strided / sparse_fixed (Sparse Transformer)
    for name in ("stride", "block", "summary"):
        declare(name, int)
    # lsh (Reformer)
    for name in ("n_buckets", "n_hashes", "chunk_len"):
        declare(name, int)
    # routing (Routing Transformer)
    for name in ("num_clusters", "routing_window", "num_local_heads", "local_window"):
        declare(name, int)
    declare("centroid_decay", float)
    # transient_global (LongT5)
    for name in ("local_radius", "global_block", "relative_buckets", "relative_max_distance"):
        declare(name, int)


def train(**overrides) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.task = "lm"  # lm | classification | retrieval (must fit model.name)
    t.steps = 300  # optimizer updates
    t.batch_size = 16  # global batch (all processes, all micro-batches)
    t.grad_accum_steps = 1  # micro-batches per update; batch_size must divide evenly
    t.learning_rate = 3e-3  # peak learning rate
    t.warmup_steps = 30  # linear warmup from 0
    t.min_lr_ratio = 0.1  # cosine decays to learning_rate * min_lr_ratio
    t.weight_decay = 0.1  # AdamW decoupled decay on matrices only
    t.b1 = 0.9
    t.b2 = 0.95
    t.grad_clip = ml_collections.FieldReference(1.0, field_type=float)  # global-norm clip; None disables
    t.checkpoint_every = 100  # save every N steps (and at the end, and on SIGTERM/SIGINT)
    t.keep_checkpoints = 3  # keep the newest K
    t.eval_every = 100  # held-out evaluation every N steps (and at the end)
    t.log_every = 10  # progress line + metrics.jsonl row every N steps
    t.seed = 0  # params init and data order: batches are a pure function of (seed, step)
    t.contrastive_temperature = 0.05  # retrieval: InfoNCE temperature
    t.sample_prompt = "The Python "  # lm: prompt for the sample printed after training
    t.sample_tokens = 120  # lm: how many bytes to generate for that sample
    t.update(overrides)
    return t


def mesh(**overrides) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.data = 1  # data-parallel replicas
    m.fsdp = 1  # fully-sharded data parallel (params split over 'embed')
    m.tensor = 1  # tensor parallel (heads, mlp, vocab)
    # Logical axis -> mesh axes (t5x-style). Dimensions a mesh axis does not divide are replicated.
    m.rules = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("experts", None),
    )
    m.update(overrides)
    return m


def experiment(model_cfg, data_cfg, train_cfg, mesh_cfg) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model, c.data, c.train, c.mesh = model_cfg, data_cfg, train_cfg, mesh_cfg
    return c
