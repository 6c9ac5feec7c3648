"""Sections 4 and 5: building blocks and models, checked against references and exact properties."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 40

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(pico, model_name, *extra, vocab_size=VOCAB):
    """`model_name` built as the command line with these flags (reduced widths) builds it."""
    config = pico.config_from_command_line(
        ["--block_size", "16", "--embed_size", "16", "--d_model", "32", "--n_heads", "4",
         "--n_blocks", "2", *extra])
    return pico.build_model(config.models.config_of(model_name), vocab_size, config.training.seed)


ATTENTION_KINDS = {"": [], " linear": ["--attention", "linear"],
                   " gated_linear fixed": ["--attention", "gated_linear", "--linear_attention_gate", "fixed"],
                   " gated_linear data": ["--attention", "gated_linear", "--linear_attention_gate", "data"]}


def all_tiny_models(pico):
    """One tiny model of every kind, and of every preset with every kind of attention (reduced
    width through the override flags; GPT-oss's window of 4 slides within the 16-token block)."""
    models = {}
    for variant in ("onehot", "embedding", "conv"):
        models[f"kgram_{variant}"] = tiny_model(pico, "kgram_mlp_seq", "--kgram_variant", variant)
    models["lstm"] = tiny_model(pico, "lstm_seq", "--lstm_layers", "2")
    for preset in pico.TRANSFORMER_PRESETS:
        for kind, attention in ATTENTION_KINDS.items():
            extra = {"Llama3-lite": ["--n_kv_heads", "2"],
                     "GPT-oss": ["--sliding_window", "4"] if not attention else []}.get(preset, [])
            models[preset + kind] = tiny_model(pico, "transformer", "--transformer_variant", preset,
                                               *attention, *extra)
    models["pico qk_norm head_size 12"] = tiny_model(pico, "transformer", "--qk_norm", "true",
                                                     "--head_size", "12", "--n_kv_heads", "2")
    # Every speedrun switch together, on blocks that start random, so that the value
    # embeddings and skips change the output the tests compare.
    models["pico speedrun blocks"] = tiny_model(pico, "transformer", *SPEEDRUN_BLOCKS, "--n_blocks", "4",
                                                "--n_kv_heads", "2")
    return models


SPEEDRUN_BLOCKS = ["--ffn", "relu2", "--logit_softcap", "3", "--value_embeddings", "true",
                   "--unet_skips", "true", "--qk_norm", "true"]


@pytest.fixture(scope="module")
def models(pico):
    return all_tiny_models(pico)


def test_every_model_maps_seq_batch_tokens_to_seq_batch_vocab_logits(models):
    tokens = torch.randint(0, VOCAB, (12, 3))
    for name, model in models.items():
        assert model(tokens).shape == (12, 3, VOCAB), name


def test_every_model_is_causal(models):
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (10, 2))
    changed = tokens.clone()
    changed[6:] = (changed[6:] + 1) % VOCAB
    for name, model in models.items():
        model.eval()
        before, after = model(tokens), model(changed)
        assert torch.allclose(before[:6], after[:6], atol=1e-5), name
        assert not torch.allclose(before[6:], after[6:]), name


def test_kgram_window_is_the_k_tokens_ending_at_the_current_one(pico):
    torch.manual_seed(0)
    model = pico.KGramMLPSeqModel(VOCAB, k=3, embed_size=8).eval()
    tokens = torch.randint(0, VOCAB, (10, 1))
    logits = model(tokens)
    for position_changed, affected in ((7, {7, 8, 9}), (2, {2, 3, 4})):
        changed = tokens.clone()
        changed[position_changed] = (changed[position_changed] + 1) % VOCAB
        differs = {t for t in range(10) if not torch.allclose(model(changed)[t], logits[t])}
        assert differs == affected


def test_kgram_onehot_equals_a_linear_layer_on_concatenated_one_hots(pico):
    torch.manual_seed(0)
    k, embed = 3, 8
    model = pico.KGramMLPSeqModel(VOCAB, k=k, embed_size=embed, variant="onehot").eval()
    tokens = torch.randint(0, VOCAB, (9, 2))
    padded = torch.cat([torch.full((k - 1, 2), VOCAB), tokens])        # padding id = VOCAB
    windows = padded.unfold(0, k, 1)                                     # (T, B, k)
    one_hot = F.one_hot(windows, VOCAB + 1).float().flatten(-2)          # (T, B, k * (V + 1))
    first_layer = one_hot @ model.onehot_weight + model.onehot_bias      # explicit matmul
    expected = model.unembedding(model.mlp(first_layer))
    assert torch.allclose(model(tokens), expected, atol=1e-5)


def test_kgram_chunking_does_not_change_the_result(pico):
    torch.manual_seed(0)
    whole = pico.KGramMLPSeqModel(VOCAB, k=3, embed_size=8, variant="conv")
    chunked = pico.KGramMLPSeqModel(VOCAB, k=3, embed_size=8, variant="conv", chunk_size=4)
    chunked.load_state_dict(whole.state_dict())
    tokens = torch.randint(0, VOCAB, (11, 2))
    assert torch.allclose(whole(tokens), chunked(tokens), atol=1e-6)


def test_rmsnorm_matches_torch(pico):
    torch.manual_seed(0)
    ours, reference = pico.RMSNorm(16, eps=1e-5), nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16))
        reference.weight.copy_(ours.weight)
    x = torch.randn(4, 5, 16) * 3
    assert torch.allclose(ours(x), reference(x), atol=1e-5)
    assert ours(x.bfloat16()).dtype == torch.bfloat16


def test_rope_makes_scores_depend_only_on_position_difference(pico):
    torch.manual_seed(0)
    rope = pico.RotaryEmbedding(8, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(query_position, key_position):
        rq = rope.rotate(q, *rope.angles(torch.tensor([query_position])))
        rk = rope.rotate(k, *rope.angles(torch.tensor([key_position])))
        return float((rq * rk).sum())

    assert score(5, 3) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(5, 3) != pytest.approx(score(5, 4), abs=1e-3)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-6)


def test_rope_rotates_adjacent_pairs_by_position_times_frequency(pico):
    rope = pico.RotaryEmbedding(4, theta=100.0)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    out = rope.rotate(x, *rope.angles(torch.tensor([3]))).flatten()
    for pair in range(2):
        angle = 3 * 100.0 ** (-2 * pair / 4)
        assert out[2 * pair].item() == pytest.approx(math.cos(angle), abs=1e-6)
        assert out[2 * pair + 1].item() == pytest.approx(math.sin(angle), abs=1e-6)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_sdpa_attention_matches_the_math_path(pico, n_kv_heads):
    torch.manual_seed(0)
    fast = pico.CausalSelfAttention(32, 4, n_kv_heads, bias=False, dropout=0.0, impl="sdpa")
    math_path = pico.CausalSelfAttention(32, 4, n_kv_heads, bias=False, dropout=0.0, impl="math")
    math_path.load_state_dict(fast.state_dict())
    x = torch.randn(2, 7, 32)
    assert torch.allclose(fast(x, None), math_path(x, None), atol=1e-5)


@pytest.mark.parametrize("head_dim", [None, 12])
def test_qk_norm_normalizes_each_heads_query_and_key_before_rope(pico, head_dim):
    """With QK-norm every head's query and key reach the scores with RMS 1 (gains start at 1),
    however large the projections; the fused and written-out paths still agree, and a head
    size apart from d_model / n_heads changes only the projections' widths."""
    torch.manual_seed(0)
    fast = pico.CausalSelfAttention(32, 4, 2, bias=False, dropout=0.0, impl="sdpa",
                                    head_dim=head_dim, qk_norm=True)
    math_path = pico.CausalSelfAttention(32, 4, 2, bias=False, dropout=0.0, impl="math",
                                         head_dim=head_dim, qk_norm=True)
    math_path.load_state_dict(fast.state_dict())
    width = head_dim or 8
    assert fast.q_proj.weight.shape == (4 * width, 32) and fast.k_proj.weight.shape == (2 * width, 32)
    x = 100 * torch.randn(2, 7, 32)
    seen = {}
    fast.q_norm.register_forward_hook(lambda module, args, out: seen.setdefault("q", out))
    fast.k_norm.register_forward_hook(lambda module, args, out: seen.setdefault("k", out))
    out = fast(x, None)
    assert out.shape == (2, 7, 32)
    for name in "qk":
        rms = seen[name].pow(2).mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)
    assert torch.allclose(out, math_path(x, None), atol=1e-4)
    plain = pico.CausalSelfAttention(32, 4, 2, bias=False, dropout=0.0, impl="sdpa", head_dim=head_dim)
    plain.load_state_dict(fast.state_dict(), strict=False)
    assert not torch.allclose(plain(x, None), out, atol=1e-3)


def test_math_attention_weights_are_causal_and_normalized(pico):
    torch.manual_seed(0)
    attention = pico.CausalSelfAttention(16, 2, 2, bias=False, dropout=0.0, impl="math")
    attention.record_attention = True
    attention(torch.randn(1, 5, 16), None)
    weights = attention.last_attention[0]                      # (H, T, S)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 5))
    assert torch.all(weights.triu(diagonal=1) == 0)


def test_swiglu_is_w2_of_silu_w1_times_w3(pico):
    torch.manual_seed(0)
    ffn = pico.FeedForward(8, 16, "swiglu", bias=False, dropout=0.0)
    x = torch.randn(3, 8)
    expected = ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))
    assert torch.allclose(ffn(x), expected)
    assert pico.default_ffn_width(1024, "swiglu") == 2752
    assert pico.default_ffn_width(128, "gelu") == 512


def test_soft_cap_bounds_the_logits_and_leaves_small_ones_alone(pico):
    logits = torch.tensor([-1000.0, -0.01, 0.0, 0.01, 1000.0])
    capped = pico.soft_cap(logits, 15.0)
    assert capped.abs().max() <= 15.0 and capped[0] == -capped[-1]
    assert torch.allclose(capped[1:4], logits[1:4], atol=1e-6)
    assert torch.equal(pico.soft_cap(logits, 0.0), logits)


def test_relu2_is_w2_of_relu_w1_squared(pico):
    torch.manual_seed(0)
    ffn = pico.FeedForward(8, 16, "relu2", bias=False, dropout=0.0)
    x = torch.randn(5, 8)
    assert ffn.w3 is None
    assert torch.allclose(ffn(x), ffn.w2(torch.clamp(ffn.w1(x), min=0) ** 2), atol=1e-6)


def test_gelu_exact_is_the_erf_form_and_gelu_the_tanh_form(pico):
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    exact = pico.FeedForward(8, 16, "gelu_exact", bias=False, dropout=0.0)
    hidden = exact.w1(x)
    assert torch.allclose(exact(x), exact.w2(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))),
                          atol=1e-6)
    tanh_form = pico.FeedForward(8, 16, "gelu", bias=False, dropout=0.0)
    tanh_form.load_state_dict(exact.state_dict())
    tanh_hidden = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
    assert torch.allclose(tanh_form(x), exact.w2(tanh_hidden), atol=1e-6)
    assert not torch.equal(tanh_form(x), exact(x))


def test_zero_init_proj_starts_every_block_as_the_identity(pico):
    model = tiny_model(pico, "transformer", "--zero_init_proj", "true", "--n_blocks", "3")
    tokens = torch.randint(0, VOCAB, (10, 2))
    embedded = model.token_embedding(tokens.t()).transpose(0, 1)
    assert torch.allclose(model.features(tokens), model.final_norm(embedded), atol=1e-6)
    assert all(p.abs().sum() == 0 for name, p in model.named_parameters()
               if name.endswith(("out_proj.weight", "w2.weight")))


@pytest.mark.parametrize("weights", ["skip_weights", "value_embedding_weight"])
def test_speedrun_options_with_zero_weights_are_the_model_without_them(pico, weights):
    """U-net skips with weights 0, or value embeddings mixed in at weight 0, give exactly the
    model without them (same remaining weights): each option adds only its weighted term. The
    skips connect block i's output to block L-1-i's input: with one weight nonzero, only
    the blocks from that input on see a change."""
    flag = {"skip_weights": "--unet_skips", "value_embedding_weight": "--value_embeddings"}[weights]
    plain = tiny_model(pico, "transformer", "--n_blocks", "4")
    extended = tiny_model(pico, "transformer", "--n_blocks", "4", flag, "true")
    extended.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for name, p in extended.named_parameters():
            if name.endswith(weights):
                p.zero_()
    tokens = torch.randint(0, VOCAB, (10, 2))
    assert torch.allclose(extended(tokens), plain(tokens), atol=1e-6)
    with torch.no_grad():
        for name, p in extended.named_parameters():
            if name.endswith(weights):
                p.fill_(1.0)
    assert not torch.allclose(extended(tokens), plain(tokens), atol=1e-4)


def test_unet_skips_join_block_i_to_block_l_minus_1_minus_i(pico):
    """In four blocks, block 0's output joins block 3's input and block 1's joins block 2's,
    each times its own weight: the encoder's first half mirrored, as a U-net's."""
    model = tiny_model(pico, "transformer", "--n_blocks", "4", "--unet_skips", "true").eval()
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.3, 0.7]))
    inputs, outputs = [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        block.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (10, 2)))
    torch.testing.assert_close(inputs[1], outputs[0])
    torch.testing.assert_close(inputs[2], outputs[1] + 0.3 * outputs[1])
    torch.testing.assert_close(inputs[3], outputs[2] + 0.7 * outputs[0])


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_a_block_is_its_norm_position_written_out(pico, norm_position):
    """Pre-norm (GPT-2 on): x + attention(norm(x)), then h + ffn(norm(h)). Post-norm (the 2017
    Transformer): norm(x + attention(x)), then norm(h + ffn(h)): both sub-layers' outputs are
    normalized, none of their inputs."""
    model = tiny_model(pico, "transformer", "--norm_position", norm_position, "--pos_emb",
                       "learned", "--ffn", "silu", "--n_blocks", "1").eval()
    block = model.blocks[0]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        x = torch.randn(2, 7, 32, generator=generator)
        if norm_position == "pre":
            h = x + block.attention(block.attention_norm(x), None)
            expected = h + block.ffn(block.ffn_norm(h))
        else:
            h = block.attention_norm(x + block.attention(x, None))
            expected = block.ffn_norm(h + block.ffn(h))
        torch.testing.assert_close(block(x, None), expected)


def test_sinusoidal_positions_are_vaswanis_sines_and_cosines_at_the_embeddings_scale(pico):
    """PE(p, 2i) = sin(p / 10000^(2i/d)) and PE(p, 2i+1) = cos(p / 10000^(2i/d)), added to the
    token embeddings at their initial scale (0.02), not at unit amplitude."""
    positions, d = torch.arange(5), 8
    pe = pico.sinusoidal_position_embedding(positions, d)                       # (5, 8)
    angle = positions[:, None].double() / 10000 ** (torch.arange(0, d, 2).double() / d)
    torch.testing.assert_close(pe[:, 0::2], angle.sin().float())
    torch.testing.assert_close(pe[:, 1::2], angle.cos().float())
    assert pe[0].tolist() == [0.0, 1.0] * 4
    model = tiny_model(pico, "transformer", "--pos_emb", "sinusoidal").eval()
    with torch.no_grad():
        model.token_embedding.weight.zero_()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (5, 2)))
    expected = 0.02 * pico.sinusoidal_position_embedding(positions, 32)
    torch.testing.assert_close(seen[0], expected.expand(2, 5, 32))


def test_residual_projections_start_smaller_with_depth_as_gpt2s(pico):
    """GPT-2's init: weights of std 0.02, but the projections that write into the residual
    stream (attention's out_proj, the feed-forward's w2) 0.02 / sqrt(2 x blocks), so the
    stream's variance stays about 1 whatever the depth."""
    config = pico.config_from_command_line(["--d_model", "256", "--n_heads", "4", "--n_blocks",
                                            "8", "--ffn", "gelu"])
    model = pico.build_model(config.models.transformer, 512, config.training.seed)
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2:
            continue
        std = 0.02 / 4 if name.endswith(("out_proj.weight", "w2.weight")) else 0.02
        assert parameter.std().item() == pytest.approx(std, rel=0.05), name


@pytest.mark.parametrize("preset", ["pico", "minGPT", "GPT2-small", "GPT-oss", "Llama3-lite"])
def test_presets_fill_the_documented_fields(configure, preset):
    config = configure("--transformer_variant", preset).models.transformer
    expected = {
        "minGPT": dict(d_model=192, n_heads=6, n_blocks=6, ffn="gelu", d_ff=768, norm="layernorm",
                       pos_emb="learned", tie_weights=False, bias=True, dropout=0.1),
        "GPT2-small": dict(d_model=768, n_heads=12, n_blocks=12, norm="layernorm", d_ff=3072,
                           pos_emb="learned", tie_weights=True, bias=True),
        "GPT-oss": dict(d_model=512, n_heads=8, n_kv_heads=2, n_blocks=8, pos_emb="rope",
                        ffn="clamped_swiglu", d_ff=512, n_experts=8, experts_per_token=2,
                        attention_sinks=True, sliding_window=16, bias=True, rope_theta=150000.0,
                        yarn_factor=1.0, norm="rmsnorm", tie_weights=False),
        "Llama3-lite": dict(d_model=1024, n_heads=16, n_blocks=8, pos_emb="rope", ffn="swiglu",
                            d_ff=3584, norm="rmsnorm", tie_weights=False),
        "pico": dict(n_blocks=3, attention="softmax", n_experts=0),
    }[preset]
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    if preset == "Llama3-lite":
        assert config.n_kv_heads < config.n_heads


def test_flags_override_preset_fields(pico, configure):
    config = configure("--transformer_variant", "GPT-oss", "--d_model", "64", "--n_heads", "2",
                       "--pos_emb", "learned", "--tie_weights", "true").models.transformer
    assert (config.d_model, config.n_heads, config.pos_emb, config.tie_weights) == (64, 2, "learned", True)
    assert config.d_ff == pico.default_ffn_width(64, "clamped_swiglu") == 64
    model = pico.build_model(config, 100, seed=0)
    assert model.unembedding.weight is model.token_embedding.weight


def test_bias_flag_removes_the_minGPT_presets_biases(pico, configure):
    """--bias false: minGPT's shape as nanoGPT trains it, no bias in any linear layer or norm."""
    for flag, expected in (("true", True), ("false", False)):
        config = configure("--transformer_variant", "minGPT", "--bias", flag).models.transformer
        model = pico.build_model(config, 100, seed=0)
        biases = [name for name, _ in model.named_parameters() if name.endswith(".bias")]
        assert config.bias is expected and bool(biases) is expected


def test_enable_transformer_gptoss_adds_the_gptoss_model(configure):
    models = configure("--models", "lstm_seq", "--enable_transformer_gptoss").models
    assert models.names == ["lstm_seq", "transformer_gptoss"]
    assert models.config_of("transformer_gptoss").d_model == 512


@pytest.mark.parametrize("flags, message", [
    (["--d_model", "30", "--n_heads", "4"], "must divide --d_model"),
    (["--n_heads", "4", "--n_kv_heads", "3"], "must divide --n_heads"),
    (["--n_blocks", "0"], "positive"),
    (["--n_experts", "4", "--experts_per_token", "5"], r"between 1 and --n_experts \(4\)"),
    (["--n_experts", "-1"], "must not be negative"),
    (["--sliding_window", "-1"], "must not be negative"),
    (["--attention", "linear", "--sliding_window", "8"], "an option of softmax attention"),
    (["--attention", "gated_linear", "--attention_sinks", "true"], "an option of softmax attention"),
    (["--attention", "linear", "--qk_norm", "true"], "an option of softmax attention"),
    (["--head_size", "-2"], "must not be negative"),
    (["--head_size", "7"], "even head size"),
    (["--linear_attention_gate", "fixed"], "an option of --attention gated_linear"),
    (["--yarn_factor", "0.5"], "at least 1"),
    (["--d_model", "12", "--n_heads", "4"], "even head size"),
    (["--transformer_variant", "gpt5"], "unknown --transformer_variant"),
])
def test_invalid_transformer_configs_are_user_errors(pico, flags, message):
    with pytest.raises(pico.UserError, match=message):
        pico.parse_args(["--models", "transformer", *flags])


def test_a_presets_softmax_options_under_linear_attention_are_dropped_and_noted(pico, capsys):
    """The options a preset sets for softmax attention (GPT-oss's sinks and window, the
    speedrun's QK-norm) are left out under another --attention, and a note names them."""
    args = pico.parse_args(["--models", "transformer,lstm_seq", "--enable_transformer_gptoss",
                            "--transformer_variant", "SpeedRun", "--attention", "linear"])
    flags = vars(args)
    gptoss = pico.transformer_config_from_flags(flags, "transformer_gptoss")
    assert (gptoss.attention_sinks, gptoss.sliding_window, gptoss.n_experts) == (False, 0, 8)
    assert pico.transformer_config_from_flags(flags, "transformer").qk_norm is False
    pico.note_preset_options_left_out(flags, args.models)
    assert capsys.readouterr().err.splitlines() == [
        "pico-llm: note: the speedrun preset's qk_norm is an option of softmax attention, so "
        "transformer is built without it under --attention linear",
        "pico-llm: note: the GPT-oss preset's attention_sinks and sliding_window are options of "
        "softmax attention, so transformer_gptoss is built without them under --attention linear"]
    for softmax in (["--attention", "softmax"], []):   # nothing dropped, nothing said
        flags = vars(pico.parse_args(["--models", "transformer", "--transformer_variant", "GPT-oss",
                                      *softmax]))
        pico.note_preset_options_left_out(flags, ["transformer"])
    pico.note_preset_options_left_out(vars(pico.parse_args(["--attention", "linear"])),
                                      ["transformer"])          # pico: no softmax options
    assert capsys.readouterr().err == ""


def test_a_presets_window_that_sees_the_whole_context_is_noted(pico, capsys):
    """GPT-oss's 16-token window at --block_size 16 or less: its windowed blocks attend as the
    others do, which had gone unsaid (the same window typed is refused)."""
    for block_size, said in (("16", True), ("17", False)):
        flags = vars(pico.parse_args(["--models", "transformer", "--transformer_variant",
                                      "GPT-oss", "--block_size", block_size]))
        pico.note_preset_options_left_out(flags, ["transformer"])
        assert capsys.readouterr().err == (
            "pico-llm: note: the GPT-oss preset's sliding window of 16 tokens sees all of "
            "--block_size 16, so transformer's windowed blocks attend as its others do; give "
            "--sliding_window below 16 to keep them apart\n" if said else "")
    flags = vars(pico.parse_args(["--models", "transformer", "--transformer_variant", "GPT-oss",
                                  "--block_size", "8", "--sliding_window", "4"]))
    pico.note_preset_options_left_out(flags, ["transformer"])       # a window of its own: 4
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "none", "rope"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_transformer_options_build_and_run(pico, pos_emb, norm_position):
    """Each option builds what it names. Without positions, one block's attention sees the
    context as a set: shuffling the tokens before the last leaves the last position's logits
    as they were; every kind of position changes them. A final norm only in pre-norm stacks.
    (Weights are drawn larger than at init, where a post-norm block barely mixes tokens.)"""
    model = tiny_model(pico, "transformer", "--pos_emb", pos_emb, "--norm_position", norm_position,
                       "--ffn", "silu", "--n_blocks", "1").eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    tokens = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:16, None]  # (16, 1)
    shuffled = torch.cat([tokens[:-1].flip(0), tokens[-1:]])
    assert model(tokens).shape == (16, 1, VOCAB)
    order_blind = torch.allclose(model(tokens)[-1], model(shuffled)[-1], atol=1e-5)
    assert order_blind == (pos_emb == "none")
    assert all(block.pre_norm == (norm_position == "pre") for block in model.blocks)
    assert isinstance(model.final_norm, torch.nn.Identity) == (norm_position == "post")


def test_parameter_counts_match_a_hand_count(pico):
    config = pico.TransformerConfig(vocab_size=100, block_size=8, d_model=16, n_heads=2, n_blocks=1,
                                    ffn="gelu", d_ff=64, norm="layernorm", pos_emb="learned",
                                    tie_weights=True, bias=True)
    model = pico.TransformerModel(config)
    embeddings = 100 * 16 + 8 * 16
    attention = 4 * (16 * 16 + 16)
    ffn = 16 * 64 + 64 + 64 * 16 + 16
    norms = 3 * 2 * 16
    assert pico.count_parameters(model) == embeddings + attention + ffn + norms
    flops = pico.training_flops_per_token(model, 8)
    matmul_weights = 4 * 16 * 16 + 2 * 16 * 64 + 100 * 16
    assert flops == 6 * matmul_weights + 12 * 1 * 16 * 8


# --- Appendix A: float32 CPU linears through oneDNN, switched on by speed_up -------------

def test_onednn_ships_with_the_pinned_cpu_wheel(pico):
    """requirements.txt pins a PyTorch whose x86-64 CPU build carries oneDNN; if a new pin
    loses it, training silently drops to half speed, so say so here."""
    import platform
    if platform.machine() in ("x86_64", "AMD64"):
        assert pico.onednn_available()


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_torch_values_and_gradients(pico, bias):
    if not pico.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(3, 7, 24).transpose(0, 1).requires_grad_()    # (7, 3, 24), not contiguous
    grad_y = torch.randn(7, 3, 40)
    results = {}
    for kernel in ("torch", "onednn"):
        layer.zero_grad()
        x.grad = None
        if kernel == "onednn":
            layer.__class__ = pico.FastLinear          # what speed_up does to every nn.Linear
        y = layer(x)
        y.backward(grad_y)
        results[kernel] = [y.detach(), x.grad, layer.weight.grad] + ([layer.bias.grad] if bias else [])
    assert results["onednn"][0].shape == (7, 3, 40)
    for ours, theirs in zip(results["onednn"], results["torch"]):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_fast_linear_uses_onednn_only_for_float32_on_the_cpu(pico, monkeypatch):
    """oneDNN takes float32 on the CPU outside autocast, and at least one row: an expert no
    position chose gets none, for which oneDNN has no primitive on some builds."""
    calls = []
    monkeypatch.setattr(pico.OneDNNLinear, "apply", lambda *a: calls.append(a) or F.linear(*a))
    layer = pico.FastLinear(4, 3)
    x = torch.randn(2, 4)
    layer(x)
    assert len(calls) == 1
    assert layer(x[:0]).shape == (0, 3)
    layer.double()(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.float()(x)
    nn.Linear(4, 3)(x)
    assert len(calls) == 1


def test_fast_linear_without_gradients_leaves_small_products_to_torch(pico, monkeypatch):
    """Sampling and evaluation read small products (a row a token) where oneDNN's cost per
    call outweighs its speed: those go to F.linear, larger ones to oneDNN, with equal values;
    a product that needs gradients always takes oneDNN's autograd function."""
    if not pico.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    calls = []
    product = pico.onednn_matmul
    monkeypatch.setattr(pico, "onednn_matmul", lambda *a: calls.append(a[0].shape) or product(*a))
    torch.manual_seed(0)
    small, large = pico.FastLinear(128, 384), pico.FastLinear(512, 512)
    with torch.no_grad():
        for layer, rows in ((small, 1), (small, 64), (large, 1), (small, 1024)):
            x = torch.randn(rows, 1, layer.in_features)                    # (T, B, in)
            assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
    assert calls == [(1, 512), (1024, 128)]           # the 512 x 512 weight; 1024 rows x 128 x 384
    small(torch.randn(1, 128)).sum().backward()       # with gradients: OneDNNLinear, whatever size
    assert len(calls) == 3 and small.weight.grad is not None


def test_speed_up_is_the_one_switch_and_changes_no_parameter(pico, monkeypatch):
    cpu = torch.device("cpu")
    model = tiny_model(pico, "transformer")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    attention = [m for m in model.modules() if isinstance(m, pico.CausalSelfAttention)]
    assert attention and all(m.rotate is pico.RotaryEmbedding.rotate for m in attention)
    plain = pico.speed_up(model, pico.SpeedConfig(loss="plain", cpu_matmul="torch"), cpu)
    assert type(plain) is pico.NextTokenLoss
    assert all(m.rotate is pico.rotate_pairs_complex for m in attention)
    assert not any(isinstance(m, pico.FastLinear) for m in model.modules())
    monkeypatch.setattr(pico, "onednn_available", lambda: True)
    fast = pico.speed_up(model, pico.SpeedConfig(), cpu)
    assert type(fast) is pico.FusedNextTokenLoss         # a vocabulary of 40: loss_kind's choice
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is pico.FastLinear for m in linears)
    assert model.unembedding.weight is model.token_embedding.weight   # ties survive
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    monkeypatch.setattr(pico, "onednn_available", lambda: False)      # a build without oneDNN
    other = tiny_model(pico, "lstm_seq")
    pico.speed_up(other, pico.SpeedConfig(), cpu)
    assert not any(isinstance(m, pico.FastLinear) for m in other.modules())


def test_the_onednn_probe_leaves_the_global_random_generator_alone(pico):
    pico.onednn_available.cache_clear()
    torch.manual_seed(0)
    pico.onednn_available()
    after_probe = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_probe)


@pytest.mark.parametrize("freed_memory_kept", [True, False])
def test_kernels_give_the_same_chunked_loss_and_gradients_past_one_chunk(pico, monkeypatch,
                                                                       freed_memory_kept):
    """300 positions in 128-row chunks span three. With freed memory kept, oneDNN carries
    the weight gradient as a transposed running sum; without, it adds in place."""
    if not pico.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear: nothing to compare")
    monkeypatch.setitem(pico._freed_memory, "kept", freed_memory_kept)
    torch.manual_seed(0)
    layer = nn.Linear(16, 70)
    hidden = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 70, (300,))
    weights = torch.rand(300)
    results = {}
    for kernel in ("torch", "onednn"):
        hidden.grad = None
        layer.zero_grad()
        if kernel == "onednn":
            layer.__class__ = pico.FastLinear
        loss = pico.linear_cross_entropy(hidden, layer, targets, weights, chunk_size=128)
        loss.backward()
        results[kernel] = (loss.detach(), hidden.grad, layer.weight.grad, layer.bias.grad)
    for ours, theirs in zip(*results.values()):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kernels_give_a_transformer_the_same_gradients(pico):
    if not pico.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear: nothing to compare")
    tokens = torch.randint(0, VOCAB, (13, 2))
    grads = {}
    for kernel in ("onednn", "torch"):
        model = tiny_model(pico, "transformer")
        pico.speed_up(model, pico.SpeedConfig(loss="plain", cpu_matmul=kernel), torch.device("cpu"))
        pico.masked_cross_entropy(model(tokens[:-1]), tokens[1:], torch.ones(12, 2)).backward()
        grads[kernel] = [p.grad.clone() for p in model.parameters()]
    for ours, theirs in zip(*grads.values()):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_onednn_linear_gradients_and_fused_sum_match_torch(pico):
    if not pico.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    torch.manual_seed(0)
    for width in (5, 30):                     # narrowing and widening layers
        x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((50, 12), (width, 12), (width,)))
        grad_y = torch.randn(50, width)
        ours = torch.autograd.grad(pico.OneDNNLinear.apply(x, w, b), (x, w, b), grad_y)
        theirs = torch.autograd.grad(F.linear(x, w, b), (x, w, b), grad_y)
        for mine, reference in zip(ours, theirs):
            assert torch.allclose(mine, reference, atol=1e-5)
    a, w, c = torch.randn(6, 4), torch.randn(9, 4), torch.randn(6, 9)
    assert torch.allclose(pico.onednn_matmul_add(a, w, c), a @ w.t() + c, atol=1e-5)


def test_onednn_gets_row_or_column_major_matrices_only(pico):
    m = torch.randn(6, 10)
    assert pico.dense(m) is m and pico.dense(m.t()).data_ptr() == m.data_ptr()
    sliced = m[:, :4]                         # rows 10 long that look 4 long
    assert pico.dense(sliced).is_contiguous() and torch.equal(pico.dense(sliced), sliced)
    if pico.onednn_available():
        a = torch.randn(6, 3)
        assert torch.allclose(pico.onednn_matmul(a.t(), sliced.t()), a.t() @ sliced, atol=1e-5)
