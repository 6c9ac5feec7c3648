"""Sections 1 to 3 beyond the pico Transformer: the written-out attention with sinks and sliding
windows, the mixture of experts and its load-balancing loss, YaRN, linear attention; and the
presets against the models they copy (transformers' GPT-2, Llama and GPT-oss, same weights)."""

import dataclasses
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from conftest import plain_and_chunked_losses

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def randomize(model, seed=0, std=0.3):
    """Weights far from the initialisation, so that a wrong mapping or formula shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=std)


def preset_model(pico, configure, preset, *flags, vocab_size=VOCAB):
    config = configure("--transformer_variant", preset, "--block_size", "32", *flags).models.transformer
    return pico.TransformerModel(dataclasses.replace(config, vocab_size=vocab_size)).eval()


# --- 1. Attention, the formula written out -------------------------------------------------

def random_mask(shape, generator):
    mask = torch.rand(shape, generator=generator) > 0.4
    mask[..., 1, :] = False                     # a query that may attend to no key at all
    return mask


@pytest.mark.parametrize("mask_shape", [(2, 3, 4, 5, 7), (5, 7), (3, 1, 5, 7)])
def test_attention_matches_torch_sdpa_values_and_gradients_under_random_masks(pico, mask_shape):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 5, 8, generator=g, requires_grad=True)      # (batch, extra, H, T, D)
    k = torch.randn(2, 3, 4, 7, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 4, 7, 8, generator=g, requires_grad=True)
    mask = random_mask(mask_shape, g)
    ours = pico.scaled_dot_product_attention(q, k, v, mask)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    their_grads = torch.autograd.grad(theirs.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, their_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_output_zero_with_finite_gradients(pico):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0] = False
    for sinks in (None, torch.randn(2, generator=g)):
        out = pico.scaled_dot_product_attention(q, k, v, mask, sinks)
        assert torch.equal(out[..., 0, :], torch.zeros(1, 2, 4))
        assert all(grad.isfinite().all() for grad in torch.autograd.grad(out.sum(), (q, k, v)))


def test_sinks_act_as_one_more_key_scoring_the_sink_with_a_zero_value(pico):
    g = torch.Generator().manual_seed(2)
    H, T, D = 3, 6, 8
    q, k, v = (torch.randn(2, H, T, D, generator=g) for _ in range(3))
    sinks = torch.randn(H, generator=g) * 2
    mask = pico.causal_mask(T, T, q.device, window=3)
    ours = pico.scaled_dot_product_attention(q, k, v, mask, sinks)
    # The extra key is zero, so its score q.k / sqrt(D) is 0; the float mask adds the sink logit.
    k_sink = torch.cat([k, torch.zeros(2, H, 1, D)], dim=2)
    v_sink = torch.cat([v, torch.zeros(2, H, 1, D)], dim=2)
    float_mask = torch.zeros(H, T, T + 1)
    float_mask[:, :, :T] = float_mask[:, :, :T].masked_fill(~mask, float("-inf"))
    float_mask[:, :, T] = sinks[:, None]
    theirs = F.scaled_dot_product_attention(q, k_sink, v_sink, attn_mask=float_mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    weights = pico.attention_weights(q, k, mask, sinks)
    assert (weights.sum(-1) < 1).all()              # the sink takes the rest


def test_sinks_match_transformers_gpt_oss_eager_attention(pico):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    g = torch.Generator().manual_seed(3)
    H, T, D = 4, 5, 8
    q, k, v = (torch.randn(2, H, T, D, generator=g) for _ in range(3))
    module = SimpleNamespace(num_key_value_groups=1, sinks=torch.randn(H, generator=g), training=False)
    mask = pico.causal_mask(T, T, q.device)
    additive = torch.zeros(T, T).masked_fill(~mask, torch.finfo(torch.float32).min)
    theirs, _ = eager_attention_forward(module, q, k, v, additive, scaling=D ** -0.5)
    ours = pico.scaled_dot_product_attention(q, k, v, mask, module.sinks)
    torch.testing.assert_close(ours.transpose(1, 2), theirs, atol=1e-6, rtol=1e-5)


def test_window_mask_sees_the_last_window_tokens_itself_included_also_after_a_cache(pico):
    T, S, window = 3, 7, 4
    mask = pico.causal_mask(T, S, torch.device("cpu"), window)
    for i in range(T):
        position = S - T + i
        assert mask[i].nonzero().flatten().tolist() == list(range(position - window + 1, position + 1))


@pytest.mark.parametrize("window", [None, 3])
def test_fused_and_written_out_attention_agree_with_windows_and_a_cache(pico, window):
    torch.manual_seed(0)
    layers = [pico.CausalSelfAttention(32, 4, 2, bias=True, dropout=0.0, impl=impl, window=window)
              for impl in ("sdpa", "math")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 9, 32)
    outputs = []
    for layer in layers:
        cache = layer.new_cache(2, 16, x.device, x.dtype)
        outputs.append(torch.cat([layer(x[:, :5], None, cache), layer(x[:, 5:7], None, cache),
                                  layer(x[:, 7:8], None, cache), layer(x[:, 8:], None, cache)], dim=1))
        torch.testing.assert_close(outputs[-1], layer(x, None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_attention_sinks_learn(pico):
    torch.manual_seed(0)
    layer = pico.CausalSelfAttention(16, 2, 2, bias=False, dropout=0.0, impl="sdpa", sinks=True)
    layer(torch.randn(2, 5, 16), None).square().sum().backward()
    assert layer.sinks.grad is not None and layer.sinks.grad.abs().sum() > 0


# --- 1. Mixture of experts -------------------------------------------------------------------

def test_clamped_swiglu_matches_transformers_gpt_oss_experts(pico):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    experts = GptOssExperts(GptOssConfig(hidden_size=8, intermediate_size=8, num_local_experts=1))
    gate_up = torch.linspace(-20, 20, 400).view(2, 200)        # far past the clamps at +-7
    expected = experts._apply_gate(gate_up)
    torch.testing.assert_close(pico.clamped_swiglu(gate_up[..., 0::2], gate_up[..., 1::2]), expected)


def moe_layer(pico, d_model=16, d_ff=12, n_experts=4, k=2):
    torch.manual_seed(0)
    moe = pico.MixtureOfExperts(d_model, d_ff, "clamped_swiglu", n_experts, k, bias=True, dropout=0.0)
    randomize(moe, std=0.5)
    return moe


def test_moe_equals_routing_each_token_by_itself(pico):
    moe = moe_layer(pico)
    x = torch.randn(3, 5, 16)
    expected = torch.zeros_like(x)
    for b in range(3):
        for t in range(5):
            top, chosen = moe.router(x[b, t]).topk(2)
            for weight, e in zip(torch.softmax(top, dim=-1), chosen):
                expected[b, t] += weight * moe.experts[int(e)](x[b, t])
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


def test_switch_loss_matches_transformers_load_balancing_loss(pico):
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func
    moe = moe_layer(pico)
    x = torch.randn(4, 6, 16)
    moe(x)
    logits = moe.router(x.reshape(-1, 16))
    expected = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    torch.testing.assert_close(moe.routing.load_balancing_loss(), expected)
    # Only the real positions count: the loss over a subset equals the loss of that subset alone.
    real = torch.arange(24) % 3 != 0
    subset = load_balancing_loss_func((logits[real],), num_experts=4, top_k=2)
    torch.testing.assert_close(moe.routing.load_balancing_loss(real), subset)
    even = pico.Routing(torch.full((8, 4), 0.25), torch.tensor([[0, 1], [2, 3]] * 4))
    assert even.load_balancing_loss().item() == pytest.approx(2.0)     # k when balanced
    moe.routing.load_balancing_loss().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_the_switch_loss_keeps_float32_under_bfloat16_autocast(pico):
    """Autocast runs matmuls in bfloat16 (8 significant bits): as `weight @ one_hot`, a count of
    choices past 256 was rounded, 2.0 for 2.0009 here. The CPU's autocast rounds as a GPU's does."""
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(1024, 8, generator=generator), dim=-1)
    chosen = torch.randint(0, 8, (1024, 2), generator=generator)
    routing = pico.Routing(probabilities, chosen)
    real = torch.arange(1024) % 5 != 0
    for mask in (None, real):
        exact = routing.load_balancing_loss(mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = routing.load_balancing_loss(mask)
        assert under_autocast.dtype == torch.float32
        torch.testing.assert_close(under_autocast, exact, rtol=1e-6, atol=0)


def test_an_expert_no_token_chose_still_gets_a_gradient_on_both_kernels(pico):
    for kernel in ("torch", "onednn"):
        moe = moe_layer(pico)
        if kernel == "onednn":
            pico.speed_up(moe, pico.SpeedConfig(), torch.device("cpu"))
        with torch.no_grad():
            moe.router.bias.copy_(torch.tensor([50.0, 50.0, -50.0, -50.0]))  # 2 and 3 never chosen
        moe.train()
        moe(torch.randn(2, 3, 16)).sum().backward()
        assert moe.usage.tolist() == [6, 6, 0, 0]
        assert all(p.grad is not None for p in moe.parameters())


@pytest.mark.parametrize("layer", ["sparse", "static"])
def test_expert_usage_counts_training_forwards_only(pico, layer):
    """The run log's expert usage is training's: the test set's evaluation and the samples,
    which run in eval mode, leave the count as it was. Taking it starts the count afresh, on
    Part I's layer and on the static-shape one --compile trains (a zero tensor from the
    start, where the sparse layer's is None)."""
    moe = moe_layer(pico).train()
    if layer == "static":
        pico.static_experts(torch.nn.Sequential(moe))
        assert type(moe) is pico.StaticShapeMixtureOfExperts and moe.take_usage() is None
    moe(torch.randn(2, 3, 16))
    counted = moe.usage.clone()
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(4, 5, 16))
    assert torch.equal(moe.take_usage(), counted) and counted.sum() == 2 * 3 * 2
    moe(torch.randn(1, 2, 16))
    assert moe.take_usage() is None


def test_the_router_loss_trains_without_changing_the_reported_loss_on_both_paths(pico, configure):
    """The loss value stays the cross-entropy; the gradient is that of cross-entropy +
    coef x Switch loss x sum of the position weights, on the plain and the chunked path."""
    model = preset_model(pico, configure, "GPT-oss", "--d_model", "32", "--n_heads", "4",
                         "--n_blocks", "2", "--router_aux_loss_coef", "0.5").train()
    tokens = torch.randint(0, VOCAB, (9, 3))
    mask = torch.rand(8, 3) > 0.3
    weights = mask.float() / mask.sum() * 0.6        # this micro-batch's share of a step
    results = plain_and_chunked_losses(pico, model, tokens[:-1], tokens[1:], weights)
    model.zero_grad()
    cross_entropy = (pico.token_cross_entropy(model(tokens[:-1]), tokens[1:]) * weights).sum()
    real = weights.t().reshape(-1) > 0
    balance = sum(block.ffn.routing.load_balancing_loss(real) for block in model.blocks)
    (cross_entropy + 0.5 * balance * 0.6).backward()
    for loss, grads in results:
        torch.testing.assert_close(loss, cross_entropy.detach(), atol=1e-6, rtol=1e-6)
        for ours, theirs in zip(grads, model.parameters()):
            torch.testing.assert_close(ours, theirs.grad, atol=1e-6, rtol=1e-5)
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0
    model.zero_grad()                                  # a stand-in micro-batch weighs nothing
    pico.NextTokenLoss(model)(tokens[:-1], tokens[1:], torch.zeros(8, 3)).backward()
    assert all(p.grad.abs().sum() == 0 for p in model.parameters())


def test_training_flops_count_the_experts_a_token_uses(pico):
    dense = pico.TransformerModel(pico.TransformerConfig(vocab_size=50, d_model=16, n_heads=2,
                                                         n_blocks=2, ffn="clamped_swiglu", d_ff=24))
    mixture = pico.TransformerModel(dataclasses.replace(dense.config, n_experts=4, experts_per_token=2))
    expert_weights, router_weights = 3 * 16 * 24, 16 * 4
    assert (pico.training_flops_per_token(mixture, 8) - pico.training_flops_per_token(dense, 8)
            == 6 * 2 * (expert_weights + router_weights))


def test_a_run_logs_each_epochs_expert_usage(pico, run_main, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the robot met the cat {i} times." for i in range(30)))
    status, _, err = run_main("--input_files", str(corpus), "--tokenizer", "char", "--models",
                              "transformer", "--transformer_variant", "GPT-oss", "--d_model", "32",
                              "--n_heads", "4", "--n_blocks", "2", "--block_size", "16", "--epochs",
                              "2", "--max_steps_per_epoch", "2", "--batch_size", "4",
                              "--max_new_tokens", "3", "--quiet", "--run_name", "moe")
    assert status == 0, err
    record = pico.load_runlog(tmp_path / "artefacts" / "moe.json")["models"]["transformer"]
    assert [entry["epoch"] for entry in record["expert_usage"]] == [1, 2]
    for entry in record["expert_usage"]:
        assert len(entry["fractions"]) == 2 and all(len(row) == 8 for row in entry["fractions"])
        assert all(sum(row) == pytest.approx(1.0) for row in entry["fractions"])


# --- 1. YaRN -------------------------------------------------------------------------------

def test_yarn_with_factor_one_is_plain_rope(pico):
    plain = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    frequency, attention_factor = pico.yarn_frequencies(16, 10000.0, 1.0, 4096)
    assert torch.equal(frequency, plain) and attention_factor == 1.0


def test_yarn_matches_transformers_gpt_oss_rope(pico):
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = GptOssConfig(head_dim=64, hidden_size=128, num_attention_heads=2)  # the released rope
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    p = config.rope_parameters
    frequency, attention_factor = pico.yarn_frequencies(64, p["rope_theta"], p["factor"],
                                                        p["original_max_position_embeddings"],
                                                        p["beta_fast"], p["beta_slow"])
    torch.testing.assert_close(frequency, expected)
    assert attention_factor == pytest.approx(expected_factor)
    assert frequency[0] == 1.0                       # the fastest pair keeps its frequency


# --- 1. Linear attention ---------------------------------------------------------------------

def random_recurrence(gate, B=2, H=3, T=37, D=4, E=5):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    v = torch.randn(B, H, T, E, generator=g)
    log_decay = {None: torch.zeros(1, 1, T, 1),
                 "fixed": torch.rand(1, H, 1, 1, generator=g).log().expand(1, H, T, 1),
                 # down to -5 per step: exp(-b_s) alone would overflow (exp(88) is float32's limit)
                 "data": -5 * torch.rand(B, H, T, D, generator=g)}[gate]
    return q, k, v, log_decay, torch.randn(B, H, D, E, generator=g)


@pytest.mark.parametrize("gate", [None, "fixed", "data"])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_chunked_form_equals_the_recurrent_form(pico, gate, chunk_size):
    q, k, v, log_decay, state = random_recurrence(gate)
    y, final = pico.chunked_linear_attention(q, k, v, log_decay, state, chunk_size)
    y_recurrent, final_recurrent = pico.recurrent_linear_attention(q, k, v, log_decay, state)
    torch.testing.assert_close(y, y_recurrent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_recurrent, atol=1e-5, rtol=1e-5)


def projections(layer, x, kv_heads):
    B, T, _ = x.shape
    q = layer.q_proj(x).view(B, T, 3, 4).transpose(1, 2)
    k, v = (proj(x).view(B, T, kv_heads, 4).transpose(1, 2) for proj in (layer.k_proj, layer.v_proj))
    return q, k, v


def test_linear_attention_is_katharopoulos_normalized_attention(pico):
    torch.manual_seed(0)
    layer = pico.LinearAttention(12, 3, 3, bias=False, gate=None)
    x = torch.randn(2, 9, 12)
    q, k, v = projections(layer, x, 3)
    scores = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)).tril()         # (B, H, T, T)
    y = (scores / scores.sum(-1, keepdim=True)) @ v
    expected = layer.out_proj(y.transpose(1, 2).reshape(2, 9, 12))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_retnet_heads_decay_as_gamma_to_the_distance(pico):
    torch.manual_seed(0)
    layer = pico.LinearAttention(12, 3, 3, bias=False, gate="fixed")
    gamma = 1 - 2.0 ** (-5 - torch.arange(3.0))
    torch.testing.assert_close(layer.head_log_decay.exp(), gamma)
    x = torch.randn(2, 9, 12)
    q, k, v = projections(layer, x, 3)
    distance = (torch.arange(9)[:, None] - torch.arange(9)[None]).float()
    decay = (gamma[:, None, None] ** distance.clamp(min=0)) * (distance >= 0)  # RetNet's D (H, T, T)
    y = layer.head_norm(((q / 2) @ k.transpose(-2, -1) * decay) @ v)           # sqrt(D) = 2
    expected = layer.out_proj(y.transpose(1, 2).reshape(2, 9, 12) * F.silu(layer.output_gate(x)))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_data_gated_linear_attention_is_glas_recurrence_forgetting_slowly(pico):
    """GLA (Yang et al., 2024) written out: S_t = diag(a_t) S_(t-1) + k_t^T v_t and
    y_t = q_t S_t / sqrt(D), with a decay a_t = sigmoid(gate logit)^(1/16) per token and per
    key dimension, so that a logit near 0 keeps 0.5^(1/16) = 96% of the state a token."""
    torch.manual_seed(0)
    layer = pico.LinearAttention(12, 3, 3, bias=False, gate="data")
    x = torch.randn(2, 9, 12)
    q, k, v = projections(layer, x, 3)                                           # (B, H, T, D)
    decay = torch.sigmoid(layer.forget_gate(x)).view(2, 9, 3, 4).transpose(1, 2) ** (1 / 16)
    state, outputs = torch.zeros(2, 3, 4, 4), []                                 # (B, H, D, D)
    for t in range(9):
        state = decay[:, :, t, :, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, None, :] / 2) @ state)                        # sqrt(D) = 2
    y = layer.head_norm(torch.cat(outputs, dim=2))                               # (B, H, T, D)
    expected = layer.out_proj(y.transpose(1, 2).reshape(2, 9, 12) * F.silu(layer.output_gate(x)))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", [None, "fixed", "data"])
def test_grouped_linear_attention_equals_each_key_value_head_repeated(pico, gate):
    torch.manual_seed(0)
    grouped = pico.LinearAttention(12, 3, 1, bias=True, gate=gate)
    full = pico.LinearAttention(12, 3, 3, bias=True, gate=gate)
    state = {name: tensor.repeat(3, *[1] * (tensor.dim() - 1)) if name.startswith(("k_", "v_"))
             else tensor for name, tensor in grouped.state_dict().items()}
    full.load_state_dict(state)
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(grouped(x), full(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gate", [None, "fixed", "data"])
def test_linear_attention_step_by_step_equals_parallel_with_a_fixed_size_state(pico, gate):
    torch.manual_seed(0)
    layer = pico.LinearAttention(12, 3, 3, bias=True, gate=gate)
    x = torch.randn(2, 21, 12)
    cache, steps = layer.new_cache(2, 21, x.device, x.dtype), []
    for start, size in [(0, 7), *((t, 1) for t in range(7, 21))]:     # a prompt, then one at a time
        steps.append(layer(x[:, start:start + size], None, cache))
        assert cache.matrix.shape == (2, 3, 4, 5 if gate is None else 4)
    torch.testing.assert_close(torch.cat(steps, dim=1), layer(x), atol=1e-5, rtol=1e-5)


# --- 2.3 Every preset, every attention: cached generation ------------------------------------

ATTENTION_FLAGS = [[], ["--attention", "linear"],
                   ["--attention", "gated_linear", "--linear_attention_gate", "fixed"],
                   ["--attention", "gated_linear", "--linear_attention_gate", "data"]]


@pytest.mark.parametrize("preset", ["pico", "minGPT", "GPT2-small", "GPT-oss", "Llama3-lite"])
@pytest.mark.parametrize("attention", ATTENTION_FLAGS, ids=["softmax", "linear", "fixed", "data"])
def test_cached_logits_equal_uncached_with_weights_far_from_init(pico, configure, preset, attention):
    """Prompt, then single tokens and short runs, past GPT-oss's window of 5 (its sliding
    blocks then keep 4 keys); weights drawn large so that any difference shows."""
    window = ["--sliding_window", "5"] if preset == "GPT-oss" and not attention else []
    model = preset_model(pico, configure, preset, "--d_model", "32", "--n_heads", "4",
                         "--n_kv_heads", "2", "--n_blocks", "3", *attention, *window)
    randomize(model, std=0.2)
    tokens = torch.randint(0, VOCAB, (14, 2))
    state, logits, start = None, [], 0
    for size in [6, 1, 1, 3, 1, 2]:
        out, state = model.forward_incremental(tokens[start:start + size], state)
        logits.append(out)
        start += size
    torch.testing.assert_close(torch.cat(logits), model(tokens), atol=1e-4, rtol=1e-4)
    if window:
        assert [cache.length for cache in state.caches] == [4, 14, 4]


def test_sliding_blocks_alternate_as_transformers_layer_types(pico):
    from transformers import GptOssConfig
    config = GptOssConfig(num_hidden_layers=6, sliding_window=5)
    ours = pico.TransformerConfig(n_blocks=6, sliding_window=5)
    expected = [5 if kind == "sliding_attention" else None for kind in config.layer_types]
    assert [ours.window(index) for index in range(6)] == expected


# --- 2.3 The presets against the models they copy -----------------------------------------------

def test_gpt2_small_is_gpt2_small(pico, configure):
    config = configure("--transformer_variant", "GPT2-small", "--block_size", "1024").models.transformer
    config = dataclasses.replace(config, vocab_size=50257)
    with torch.device("meta"):                          # shapes only, no memory
        model = pico.TransformerModel(config)
    assert pico.count_parameters(model) == 124_439_808
    assert pico.transformer_accounting(config, 1024)["total_parameters"] == 124_439_808
    assert pico.gpt2_shape_config("gpt2-small", 1024) == dataclasses.replace(
        config, dropout=0.0)


def test_llama3_feed_forward_width_follows_llamas_rule(pico, configure):
    assert pico.default_ffn_width(4096, "swiglu", 1.3) == 14336        # Llama 3 8B's published width
    assert configure("--transformer_variant", "Llama3-lite").models.transformer.d_ff == 3584
    narrow = configure("--transformer_variant", "Llama3-lite", "--d_model", "96", "--n_heads", "16")
    assert narrow.models.transformer.d_ff == 336                       # int(1.3 * 256), to 24s


def rope_pair_order(head_dim):
    """transformers rotates dims (i, i + D/2) of a head together, pico-llm (2i, 2i + 1): reorder
    each head's rows of q and k as 0, D/2, 1, D/2 + 1, ... (q.k is unchanged when both are)."""
    return torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2) + head_dim // 2],
                       dim=-1).flatten()


def interleaved(rows, head_dim):
    return rows.unflatten(0, (-1, head_dim))[:, rope_pair_order(head_dim)].flatten(0, 1)


def compare_logits(model, hf_model, seq_len=16):
    tokens = torch.randint(0, VOCAB, (2, seq_len))                 # (batch, seq)
    with torch.no_grad():
        expected = hf_model(tokens).logits                          # (B, T, vocab)
        ours = model(tokens.t()).transpose(0, 1)
    assert expected.abs().max() > 1.0
    assert (ours - expected).abs().max() < 1e-4


def perturb_norms(hf_model):
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if "norm" in name or "ln_" in name:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter) if name.endswith("weight")
                                else 0.2 * torch.randn_like(parameter))


def test_gpt2_small_logits_match_transformers_gpt2(pico, configure):
    """GPT-2's Conv1D layers hold (in, out) matrices, the transpose of nn.Linear's; its c_attn
    is q, k and v stacked along the output."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2,
                                          n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    perturb_norms(hf_model)
    model = preset_model(pico, configure, "GPT2-small", "--d_model", "64", "--n_heads", "4",
                         "--n_blocks", "2")
    hf = hf_model.state_dict()
    state = {"token_embedding.weight": hf["transformer.wte.weight"],
             "position_embedding.weight": hf["transformer.wpe.weight"],
             "final_norm.weight": hf["transformer.ln_f.weight"],
             "final_norm.bias": hf["transformer.ln_f.bias"],
             "unembedding.weight": hf["lm_head.weight"]}
    for i in range(2):
        h, ours = f"transformer.h.{i}.", f"blocks.{i}."
        for hf_name, name in (("ln_1", "attention_norm"), ("ln_2", "ffn_norm")):
            state[f"{ours}{name}.weight"] = hf[f"{h}{hf_name}.weight"]
            state[f"{ours}{name}.bias"] = hf[f"{h}{hf_name}.bias"]
        for part, (weight, bias) in zip(("q_proj", "k_proj", "v_proj"),
                                        zip(hf[h + "attn.c_attn.weight"].t().chunk(3),
                                            hf[h + "attn.c_attn.bias"].chunk(3))):
            state[f"{ours}attention.{part}.weight"], state[f"{ours}attention.{part}.bias"] = weight, bias
        for hf_name, name in (("attn.c_proj", "attention.out_proj"), ("mlp.c_fc", "ffn.w1"),
                              ("mlp.c_proj", "ffn.w2")):
            state[f"{ours}{name}.weight"] = hf[f"{h}{hf_name}.weight"].t()
            state[f"{ours}{name}.bias"] = hf[f"{h}{hf_name}.bias"]
    model.load_state_dict(state)
    compare_logits(model, hf_model)


def test_llama3_lite_logits_match_transformers_llama(pico, configure):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = preset_model(pico, configure, "Llama3-lite", "--d_model", "64", "--n_heads", "4",
                         "--n_kv_heads", "2", "--n_blocks", "2")
    hf_config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=model.config.d_ff,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                            bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_config).eval()
    randomize(hf_model, std=0.2)
    perturb_norms(hf_model)
    hf = hf_model.state_dict()
    state = {"token_embedding.weight": hf["model.embed_tokens.weight"],
             "final_norm.weight": hf["model.norm.weight"], "unembedding.weight": hf["lm_head.weight"]}
    for i in range(2):
        h, ours = f"model.layers.{i}.", f"blocks.{i}."
        state[ours + "attention_norm.weight"] = hf[h + "input_layernorm.weight"]
        state[ours + "ffn_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
        state[ours + "attention.q_proj.weight"] = interleaved(hf[h + "self_attn.q_proj.weight"], 16)
        state[ours + "attention.k_proj.weight"] = interleaved(hf[h + "self_attn.k_proj.weight"], 16)
        state[ours + "attention.v_proj.weight"] = hf[h + "self_attn.v_proj.weight"]
        state[ours + "attention.out_proj.weight"] = hf[h + "self_attn.o_proj.weight"]
        for hf_name, name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            state[f"{ours}ffn.{name}.weight"] = hf[f"{h}mlp.{hf_name}.weight"]
    model.load_state_dict(state)
    compare_logits(model, hf_model)


def load_gpt_oss_state(model, hf):
    """transformers' GptOssForCausalLM state dict into pico-llm's GPT-oss. Besides renaming and
    the RoPE row order: transformers keeps a layer's E experts in 3-D tensors applied as x @ W + b,
    gate_up_proj (E, d_model, 2 d_ff) with gate and up columns interleaved (gate 0, up 0, gate 1,
    ...), down_proj (E, d_ff, d_model); pico-llm has one FeedForward of nn.Linear (out, in) per
    expert, w1 = gate, w3 = up, w2 = down, each the transpose."""
    D = model.config.head_dim
    state = {"token_embedding.weight": hf["model.embed_tokens.weight"],
             "final_norm.weight": hf["model.norm.weight"], "unembedding.weight": hf["lm_head.weight"]}
    for i in range(len(model.blocks)):
        h, ours = f"model.layers.{i}.", f"blocks.{i}."
        state[ours + "attention_norm.weight"] = hf[h + "input_layernorm.weight"]
        state[ours + "ffn_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
        state[ours + "attention.sinks"] = hf[h + "self_attn.sinks"]
        for hf_name, name in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                              ("o_proj", "out_proj")):
            for kind in ("weight", "bias"):
                tensor = hf[f"{h}self_attn.{hf_name}.{kind}"]
                state[f"{ours}attention.{name}.{kind}"] = (interleaved(tensor, D)
                                                           if name in ("q_proj", "k_proj") else tensor)
        state[ours + "ffn.router.weight"] = hf[h + "mlp.router.weight"]
        state[ours + "ffn.router.bias"] = hf[h + "mlp.router.bias"]
        experts = h + "mlp.experts."
        gate_up, gate_up_bias = hf[experts + "gate_up_proj"], hf[experts + "gate_up_proj_bias"]
        down, down_bias = hf[experts + "down_proj"], hf[experts + "down_proj_bias"]
        for e in range(gate_up.shape[0]):
            expert = f"{ours}ffn.experts.{e}."
            state[expert + "w1.weight"], state[expert + "w1.bias"] = gate_up[e, :, 0::2].t(), gate_up_bias[e, 0::2]
            state[expert + "w3.weight"], state[expert + "w3.bias"] = gate_up[e, :, 1::2].t(), gate_up_bias[e, 1::2]
            state[expert + "w2.weight"], state[expert + "w2.bias"] = down[e].t(), down_bias[e]
    model.load_state_dict({name: tensor.detach().clone() for name, tensor in state.items()})


@pytest.mark.parametrize("yarn", [False, True])
def test_gpt_oss_logits_match_transformers_gpt_oss_past_the_sliding_window(pico, configure, yarn):
    from transformers import GptOssConfig, GptOssForCausalLM
    rope = None if yarn else {"rope_type": "default", "rope_theta": 150000.0}
    hf_config = GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                             rope_parameters=rope, attn_implementation="eager",
                             experts_implementation="eager")
    torch.manual_seed(0)
    hf_model = GptOssForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:   # large enough that the experts' clamps at +-7 are reached
                parameter.normal_(std=0.6 if "experts" in name else 0.2)
    p = hf_config.rope_parameters
    yarn_flags = (["--yarn_factor", str(p["factor"]), "--yarn_original_context",
                   str(p["original_max_position_embeddings"])] if yarn else [])
    model = preset_model(pico, configure, "GPT-oss", "--d_model", "64", "--n_heads", "4",
                         "--n_blocks", "4", "--d_ff", "48", "--n_experts", "4",
                         "--sliding_window", "5", *yarn_flags)
    load_gpt_oss_state(model, hf_model.state_dict())
    compare_logits(model, hf_model)


def test_the_kv_cache_grows_as_tokens_come_and_holds_them_all(pico):
    """Room for twice what it held (a Python list's growth), up to its capacity: a model made
    for 131,072 positions holds memory for the tokens seen, not for all it could see."""
    cache = pico.KVCache(batch=1, n_kv_heads=2, capacity=10, head_dim=3, device="cpu",
                         dtype=torch.float32)
    keys = torch.randn(1, 2, 10, 3)
    rooms = []
    for start, end in [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 10)]:
        seen_keys, seen_values = cache.append(keys[:, :, start:end], -keys[:, :, start:end])
        assert torch.equal(seen_keys, keys[:, :, :end]) and torch.equal(seen_values, -keys[:, :, :end])
        rooms.append(cache.keys.shape[2])
    assert rooms == [3, 6, 6, 6, 10, 10]
    with pytest.raises(RuntimeError, match="holds 10 tokens; 11 requested"):
        cache.append(keys[:, :, :1], keys[:, :, :1])


def test_a_long_context_models_cache_holds_only_the_tokens_it_has_seen(pico):
    config = pico.TransformerConfig(vocab_size=50, block_size=131_072, d_model=16, n_heads=2,
                                    n_blocks=2, pos_emb="rope")
    model = pico.TransformerModel(config).eval()
    tokens = torch.randint(0, 50, (5, 1))
    with torch.no_grad():
        logits, state = model.forward_incremental(tokens, None)
    assert torch.allclose(logits, model(tokens), atol=1e-5)
    assert [cache.keys.shape[2] for cache in state.caches] == [5, 5]


def test_linear_attention_sums_its_state_in_float32_under_bf16_autocast(pico):
    """Under bf16 autocast (a GPU's default) the projections run in bf16, but the state, a sum
    of keys times values over the whole text, stays float32: in bf16, plain linear
    attention's outputs drifted about 3x further from exact over 2,048 tokens. (The gated
    kinds' float32 decays promote their state anyway.)"""
    generator = torch.Generator().manual_seed(0)
    attention = pico.LinearAttention(32, 4, 4, bias=False, gate=None)
    x = torch.randn(2, 40, 32, generator=generator)
    cache = pico.LinearAttentionState()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(x, cache=cache)
        step = attention(x[:, :1], cache=cache)       # the one-token recurrence continues it
    assert cache.matrix.dtype == torch.float32
    torch.testing.assert_close(y.float(), attention(x).float(), atol=0.05, rtol=0.05)
    assert torch.isfinite(step).all()


@pytest.mark.parametrize("gate", [None, "fixed", "data"])
def test_linear_attentions_products_are_float32_under_bf16_autocast(pico, gate):
    """Autocast would run the recurrence's matmuls (each chunk's scores times values, the
    queries times the state) in bf16 although their inputs are float32: each chunk's output
    was bf16, 4e-3 from exact. Both forms agree here with float64 to float32's rounding."""
    generator = torch.Generator().manual_seed(0)
    attention = pico.LinearAttention(32, 4, 4, bias=False, gate=gate)
    x = torch.randn(2, 40, 32, generator=generator)
    seen = []

    def exact(form):
        def spy(q, k, v, log_decay, state):
            y, state_after = form(q, k, v, log_decay, state)
            with torch.autocast("cpu", enabled=False):
                expected, _ = form(*(t.double() for t in (q, k, v, log_decay, state)))
            seen.append((y, expected))
            return y, state_after
        return spy

    attention.chunked = exact(pico.chunked_linear_attention)
    cache = pico.LinearAttentionState()
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            mock.patch.object(pico, "recurrent_linear_attention",
                              exact(pico.recurrent_linear_attention)):
        attention(x, cache=cache)
        attention(x[:, :1], cache=cache)
    assert len(seen) == 2
    for y, expected in seen:
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", [None, "fixed", "data"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_linear_attention_runs_in_a_model_of_any_float_dtype(pico, gate, dtype):
    """A model cast to bf16, fp16 or float64 (no autocast): its outputs in its own dtype, close
    to float32's, its state at least float32 (half-precision inputs once met a float32 state)."""
    generator = torch.Generator().manual_seed(0)
    attention = pico.LinearAttention(32, 4, 4, bias=False, gate=gate)
    x = torch.randn(2, 40, 32, generator=generator)
    expected = attention(x)
    cache = pico.LinearAttentionState()
    y = attention.to(dtype)(x.to(dtype), cache=cache)
    attention(x[:, :1].to(dtype), cache=cache)
    assert y.dtype == dtype and cache.matrix.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.05)
