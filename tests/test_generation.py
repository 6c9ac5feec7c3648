"""Section 7: sampling rules, KV cache and carried state."""

import collections
import gc
import weakref

import pytest
import torch

from test_models import VOCAB, all_tiny_models

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nucleus_keeps_the_smallest_set_reaching_p(pico):
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    logits = probs.log()
    # Not exactly at a boundary: softmax(log(probs)) gives the probabilities only to rounding.
    expectations = {0.3: {0}, 0.4999: {0}, 0.5001: {0, 1}, 0.79: {0, 1}, 0.85: {0, 1, 2},
                    0.95: {0, 1, 2, 3}, 1.0: {0, 1, 2, 3, 4}}
    for p, allowed in expectations.items():
        kept = pico.nucleus_probabilities(logits, p)[0]
        assert {i for i in range(5) if kept[i] > 0} == allowed, p
        assert kept.sum().item() == pytest.approx(1.0)
        mass = sum(probs[0, i].item() for i in allowed)
        for i in allowed:
            assert kept[i].item() == pytest.approx(probs[0, i].item() / mass)


def test_a_token_whose_higher_ranked_mass_is_exactly_p_stays_out_of_the_nucleus(pico):
    """The nucleus ends with the token that crosses p: with four tokens of exactly 0.25 each
    (softmax of zeros, exact in float32) and p = 0.5, two are kept; the third, whose tokens
    above it hold exactly 0.5, is not."""
    kept = pico.nucleus_probabilities(torch.zeros(1, 4), 0.5)[0]
    assert sorted(kept.tolist(), reverse=True) == [0.5, 0.5, 0.0, 0.0]
    kept = pico.nucleus_probabilities(torch.zeros(1, 4), 0.5000001)[0]
    assert sorted(kept.tolist(), reverse=True) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


def test_top_p_1_keeps_every_token_of_a_large_vocabulary(pico):
    """The running sum of 50257 probabilities, rounded in float32, reaches 1 before the last
    tokens: p = 1 (plain sampling) must keep them all the same."""
    logits = torch.randn(64, 50257, generator=torch.Generator().manual_seed(0)) * 4
    kept = pico.nucleus_probabilities(logits, 1.0)
    assert (kept > 0).all()
    assert torch.equal(kept, pico.softmax(logits.float(), dim=-1))


def test_nucleus_sampling_frequencies_follow_the_renormalized_nucleus(pico):
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().expand(20000, 4)
    draws = pico.nucleus_sampling(logits, 0.7, torch.Generator().manual_seed(0))
    counts = collections.Counter(draws.tolist())
    assert set(counts) == {0, 1}
    assert counts[0] / 20000 == pytest.approx(0.5 / 0.8, abs=0.015)


def test_nucleus_works_on_unsorted_rows_independently(pico):
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    kept = pico.nucleus_probabilities(logits, 0.5)
    assert kept[0].tolist() == [0.0, 1.0, 0.0] and kept[1].tolist() == [1.0, 0.0, 0.0]


def test_top_k_and_temperature_change_the_distribution(pico):
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(pico.top_k_filter(logits, 2)[0, 2:]).all()
    generator = torch.Generator().manual_seed(0)
    rule = pico.SamplingRule(temperature=1.0, top_k=2, top_p=1.0)
    draws = {int(pico.sample_next_token(logits, rule, generator)) for _ in range(200)}
    assert draws == {0, 1}
    hot = pico.SamplingRule(temperature=100.0)
    cold = pico.SamplingRule(temperature=0.05)
    hot_draws = {int(pico.sample_next_token(logits, hot, generator)) for _ in range(300)}
    cold_draws = {int(pico.sample_next_token(logits, cold, generator)) for _ in range(300)}
    assert hot_draws == {0, 1, 2, 3} and cold_draws == {0}
    assert int(pico.sample_next_token(logits, pico.SamplingRule(temperature=0))) == 0


def test_top_k_keeps_the_tokens_tied_with_the_kth(pico):
    """Which of two equal logits is "the k-th" is arbitrary, so both stay."""
    kept = pico.top_k_filter(torch.tensor([[3.0, 2.0, 2.0, 1.0], [1.0, 1.0, 1.0, 0.0]]), 2)
    assert kept.isfinite().tolist() == [[True, True, True, False], [True, True, True, False]]


def test_top_k_1_always_draws_the_most_likely_token(pico):
    """Keeping one token leaves nothing to chance, whatever the temperature or top-p."""
    logits = torch.tensor([[1.0, 1.2, 0.9, 1.1], [0.5, 0.0, 0.4, 0.45]])
    generator = torch.Generator().manual_seed(0)
    for temperature, top_p in [(1.0, 1.0), (5.0, 1.0), (2.0, 0.99)]:
        rule = pico.SamplingRule(temperature=temperature, top_k=1, top_p=top_p)
        draws = {tuple(pico.sample_next_token(logits, rule, generator).tolist()) for _ in range(100)}
        assert draws == {(1, 0)}, rule


@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_a_vanishing_temperature_samples_the_most_likely_token(pico, temperature):
    """Dividing raw logits by 1e-300 makes them +-inf and the softmax NaN; shifted by their
    maximum first, they give the most likely token, as temperature 0 does, with top-k and top-p
    as well."""
    logits = torch.tensor([[2.0, 7.5, -1.0, 7.0], [0.0, -3.0, 1e4, 5.0]])
    generator = torch.Generator().manual_seed(0)
    for top_k, top_p in [(0, 1.0), (2, 0.9)]:
        rule = pico.SamplingRule(temperature=temperature, top_k=top_k, top_p=top_p)
        for _ in range(20):
            assert pico.sample_next_token(logits, rule, generator).tolist() == [1, 2]


@pytest.fixture(scope="module")
def models(pico):
    torch.manual_seed(0)
    return all_tiny_models(pico)


@pytest.mark.parametrize("new_tokens", [6, 40])  # 40 runs past the block size of 16
def test_cached_generation_equals_recomputation(pico, models, new_tokens):
    rule = pico.SamplingRule(temperature=0)
    for name, model in models.items():
        prompt = [3, 1, 4, 1, 5]
        cached = pico.generate_ids(model, prompt, new_tokens, rule, use_cache=True)
        uncached = pico.generate_ids(model, prompt, new_tokens, rule, use_cache=False)
        assert cached == uncached, name
        assert len(cached) == len(prompt) + new_tokens


def test_a_full_context_slides_by_half_a_block_and_the_cache_is_rebuilt_only_then(pico, models):
    """Past the block size the context keeps its last half block (window_start), so the model
    re-reads that half once and then decodes from its cache for half a block: 40 new tokens
    after a 5-token prompt with a block of 16 rebuild the cache 4 times, reading 5 then 8
    tokens, not once a token."""
    assert pico.window_start(16, 0, 16) == 0                # it fits: nothing moves
    assert pico.window_start(17, 0, 16) == 9                # 8 kept, the newest included
    assert pico.window_start(20, 9, 16) == 9                # 11 of 16: still fits
    assert pico.window_start(10, 0, None) == 0              # an LSTM reads everything
    model = models["pico"]
    reads = []
    original = model.forward_incremental

    def forward_incremental(tokens, state):
        reads.append(tokens.shape[0])
        return original(tokens, state)

    model.forward_incremental = forward_incremental
    try:
        pico.generate_ids(model, [3, 1, 4, 1, 5], 40, pico.SamplingRule(temperature=0))
    finally:
        del model.forward_incremental
    assert [n for n in reads if n > 1] == [5, 8, 8, 8, 8]
    assert len(reads) == 40


def test_each_decoded_token_goes_back_in_as_the_tensor_sampled(pico, models, monkeypatch):
    """Between cache rebuilds the model reads the sampled id as it came out of sampling, already
    on the device: building it again from a Python list would be a blocking copy to a GPU for
    every token. The host builds an input only when it reads a window afresh."""
    model, sampled, fed = models["pico"], [], []
    real_sample = pico.sample_next_token
    monkeypatch.setattr(pico, "sample_next_token", lambda logits, rule, generator: sampled.append(
        real_sample(logits, rule, generator)) or sampled[-1])
    original = model.forward_incremental
    monkeypatch.setattr(model, "forward_incremental",
                        lambda tokens, state: fed.append(tokens) or original(tokens, state),
                        raising=False)
    pico.generate_ids(model, [3, 1, 4, 1, 5], 40, pico.SamplingRule(), seed=0)
    afresh = [i for i, tokens in enumerate(fed) if tokens.shape[0] > 1]
    assert afresh == [0, 12, 21, 30, 39]                    # the prompt, then each slide
    for i, tokens in enumerate(fed):
        if i not in afresh:
            assert tokens.data_ptr() == sampled[i - 1].data_ptr(), i


def test_the_benchmarks_last_position_recompute_generates_the_same_tokens(pico, bench, models):
    """tools/benchmark.py times this baseline; it must be the same greedy generation."""
    rule = pico.SamplingRule(temperature=0)
    for name in ("pico", "Llama3-lite"):
        prompt = [3, 1, 4]
        expected = pico.generate_ids(models[name], prompt, 10, rule, use_cache=False)
        assert bench.greedy_recompute_last_position(models[name], prompt, 10, "cpu") == expected


def test_incremental_logits_match_the_full_forward(pico, models):
    tokens = torch.randint(0, VOCAB, (12, 2))
    for name, model in models.items():
        model.eval()
        full = model(tokens)
        logits, state = model.forward_incremental(tokens[:7], None)
        for t in range(7, 12):
            logits, state = model.forward_incremental(tokens[t: t + 1], state)
            assert torch.allclose(logits[-1], full[t], atol=1e-4), (name, t)


def test_several_tokens_after_a_state_continue_from_it(pico, models):
    """forward_incremental with a state and more than one new token (a prompt read in two
    parts) gives the full forward's logits at each of them."""
    tokens = torch.randint(0, VOCAB, (9, 2), generator=torch.Generator().manual_seed(1))
    for name, model in models.items():
        model.eval()
        full = model(tokens)
        _, state = model.forward_incremental(tokens[:4], None)
        logits, _ = model.forward_incremental(tokens[4:], state)
        torch.testing.assert_close(logits, full[4:], atol=1e-4, rtol=1e-4, msg=name)


def test_lstm_step_equations_match_nn_lstm_over_two_layers(pico):
    torch.manual_seed(0)
    model = pico.LSTMSeqModel(VOCAB, embed_size=6, hidden_size=5, num_layers=2).eval()
    tokens = torch.randint(0, VOCAB, (4, 3))
    _, state = model.forward_incremental(tokens[:3], None)                # nn.LSTM over the prompt
    logits, (h, c) = model.forward_incremental(tokens[3:], state)          # one step: the equations
    expected_hidden, (expected_h, expected_c) = model.lstm(model.embedding(tokens[3:]), state)
    assert torch.allclose(logits, model.unembedding(expected_hidden), atol=1e-6)
    assert torch.allclose(h, expected_h, atol=1e-6) and torch.allclose(c, expected_c, atol=1e-6)


def test_sampling_is_reproducible_with_a_seed(pico, models):
    model = models["pico"]
    rule = pico.SamplingRule(top_p=1.0)
    first = pico.generate_ids(model, [1, 2], 10, rule, seed=5)
    assert first == pico.generate_ids(model, [1, 2], 10, rule, seed=5)
    assert first != pico.generate_ids(model, [1, 2], 10, rule, seed=6)


def test_tokens_are_drawn_where_sampling_device_says(pico, models, monkeypatch):
    """generate_ids asks sampling_device where to draw (the CPU for Apple's GPU) and puts the
    logits and the seeded generator there. A CPU has one device, so the test checks the
    asking and the placing through stand-ins."""
    asked, drawn = [], []
    monkeypatch.setattr(pico, "sampling_device",
                        lambda device: asked.append(torch.device(device)) or torch.device("cpu"))
    real = pico.sample_next_token
    monkeypatch.setattr(pico, "sample_next_token", lambda logits, rule, generator: drawn.append(
        (logits.device, generator.device)) or real(logits, rule, generator))
    pico.generate_ids(models["pico"], [1, 2], 3, pico.SamplingRule(), seed=5, device="cpu")
    assert asked == [torch.device("cpu")]
    assert drawn == [(torch.device("cpu"), torch.device("cpu"))] * 3


def test_generation_stops_at_end_of_text(pico):
    class AlwaysEnd(torch.nn.Module):
        def forward_incremental(self, tokens, state):
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], 5)
            logits[..., 4] = 10.0
            return logits, state

    ids = pico.generate_ids(AlwaysEnd(), [1], 10, pico.SamplingRule(temperature=0), eot_id=4)
    assert ids == [1, 4]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_that_computes_non_finite_logits_is_refused_in_one_line(pico, temperature, value):
    """Not torch.multinomial's error, and not argmax's id 0 printed as if sampled."""
    class Broken(torch.nn.Module):
        def forward_incremental(self, tokens, state):
            return torch.full((tokens.shape[0], tokens.shape[1], 5), value), state

    model = Broken().train()
    with pytest.raises(pico.UserError, match="non-finite logits") as error:
        pico.generate_ids(model, [1], 3, pico.SamplingRule(temperature=temperature))
    assert "\n" not in str(error.value)
    assert model.training                    # left as it was found


def test_generate_text_returns_prompt_plus_continuation(pico, gpt2):
    torch.manual_seed(0)
    model = pico.build_model(pico.TransformerConfig(d_model=32, n_heads=2, n_blocks=1),
                             gpt2.vocab_size, seed=0)
    result = pico.generate_text(model, gpt2, "Hello", 5, pico.SamplingRule(temperature=0))
    assert result.text.startswith("Hello") and result.text == "Hello" + result.new_text
    assert result.num_prompt_tokens == 1
    assert len(result.token_ids) == 1 + 5 and result.new_text == gpt2.decode(result.token_ids[1:])


def test_sampling_rules_are_the_starters_plus_the_configured_one(pico, configure):
    labels = [r.label for r in pico.sampling_rules(configure().sampling)]
    assert labels == ["greedy", "top-p 0.95", "top-p 1"]
    custom = pico.sampling_rules(configure("--top_p", "0.5", "--top_k", "10",
                                           "--temperature", "0.7").sampling)
    assert custom[-1] == pico.SamplingRule(0.7, 10, 0.5) and len(custom) == 4


def test_a_configured_greedy_rule_is_the_starters_greedy(pico, configure):
    """--temperature 0 asks for greedy, which the starter's rules already sample: once, not
    twice under the same label (with --top_p's default 0.95 it is another SamplingRule)."""
    labels = [r.label for r in pico.sampling_rules(configure("--temperature", "0").sampling)]
    assert labels == ["greedy", "top-p 0.95", "top-p 1"]


@pytest.mark.parametrize("new_tokens", [6, 40])  # 40 runs past the block size of 16
def test_static_decoder_equals_uncached_generation(pico, models, new_tokens):
    """Appendix A's static-shape decoder (every cache slot, a mask, in-place writes at a device
    position) gives the uncached greedy tokens for every softmax-attention preset, GPT-oss's
    sliding window and sinks and its mixture of experts included; and draws the same sampled
    tokens from the same seed."""
    greedy, sampled = pico.SamplingRule(temperature=0), pico.SamplingRule(top_p=0.9)
    checked = 0
    for name, model in models.items():
        if not pico.StaticDecoder.supports(model):
            continue
        prompt = [3, 1, 4, 1, 5]
        uncached = pico.generate_ids(model, prompt, new_tokens, greedy, use_cache=False)
        assert pico.generate_ids(pico.StaticDecoder(model), prompt, new_tokens, greedy) == uncached, name
        assert (pico.generate_ids(pico.StaticDecoder(model), prompt, 8, sampled, seed=3)
                == pico.generate_ids(model, prompt, 8, sampled, seed=3)), name
        checked += 1
    assert checked >= len(pico.TRANSFORMER_PRESETS)   # every preset, and any extra softmax model


def test_static_decoder_logits_match_the_full_forward_at_every_position(pico, models):
    """Its logits, not only its greedy choices (a tiny random model's argmax seldom moves when
    one cache slot too many is visible), against the full forward over the whole prefix, up to
    the block size: a sliding window (GPT-oss's 4) must hide exactly what causal_mask hides."""
    tokens = torch.randint(0, VOCAB, (16, 1), generator=torch.Generator().manual_seed(1))
    checked = 0
    for name, model in models.items():
        if not pico.StaticDecoder.supports(model):
            continue
        model.eval()
        with torch.no_grad():
            full = model(tokens)                                       # (16, 1, V)
        decoder = pico.StaticDecoder(model)
        logits, state = decoder.forward_incremental(tokens[:3], None)
        assert torch.allclose(logits[-1], full[2], atol=1e-5), name
        for t in range(3, 16):
            logits, state = decoder.forward_incremental(tokens[t:t + 1], state)
            assert torch.allclose(logits[-1], full[t], atol=1e-5), (name, t)
        checked += 1
    assert checked >= len(pico.TRANSFORMER_PRESETS)


def test_static_decoder_takes_prompts_of_every_length_and_holds_no_more_than_the_context(
        pico, models):
    """A prompt of one token is a single step; of two or more, one pass over all of them. The
    cache asked for is never longer than the model's context, where generation slides on."""
    model, greedy = models["minGPT"], pico.SamplingRule(temperature=0)
    for prompt in ([3], [3, 1], [3, 1, 4]):
        assert (pico.generate_ids(pico.StaticDecoder(model), prompt, 5, greedy)
                == pico.generate_ids(model, prompt, 5, greedy, use_cache=False)), prompt
    decoder = pico.StaticDecoder(model, capacity=10 * model.config.block_size)
    assert decoder.capacity == model.config.block_size
    assert all(cache.keys.shape[2] == model.config.block_size for cache in decoder.caches)


def test_static_decoder_leaves_the_model_and_global_random_state_alone(pico, models):
    model = models["GPT-oss"]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    decoder = pico.StaticDecoder(model, dtype=torch.bfloat16)
    ids = pico.generate_ids(decoder, [3, 1, 4], 5, pico.SamplingRule(temperature=0))
    assert len(ids) == 8 and torch.equal(rng, torch.random.get_rng_state())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(type(m) is pico.MixtureOfExperts for m in model.modules()
               if isinstance(m, pico.MixtureOfExperts))
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}


def test_static_decoder_keeps_tied_embeddings_as_one_tensor(pico, models):
    """A model whose output layer is its token embedding gets a decoder holding one copy of it
    (GPT-2's is 77 MB in bf16), still tied after the cast to bf16; an untied one keeps two."""
    tying = set()
    for name, model in models.items():
        if not pico.StaticDecoder.supports(model):
            continue
        decoder = pico.StaticDecoder(model, dtype=torch.bfloat16).model
        tied = decoder.unembedding.weight is decoder.token_embedding.weight
        assert tied == model.config.tie_weights, name
        assert torch.equal(decoder.unembedding.weight.float(),
                           model.unembedding.weight.to(torch.bfloat16).float()), name
        tying.add(tied)
    assert tying == {True, False}                    # both kinds were checked


@pytest.mark.parametrize("compile", [False, True])
def test_a_dropped_static_decoder_is_freed_at_once(pico, models, compile):
    """Its weight copy and (on a GPU) its graph's memory go when generation drops it, not when
    Python's cycle collector next runs: nothing in it refers back to it."""
    decoder = pico.StaticDecoder(models["minGPT"], compile=compile)
    if not compile:
        pico.generate_ids(decoder, [3, 1, 4], 3, pico.SamplingRule(temperature=0))
    alive = weakref.ref(decoder)
    gc.disable()
    try:
        del decoder
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.slow
def test_the_compiled_static_decoder_equals_uncached_generation(pico, models):
    """--generate --compile's decoder (on a GPU inside a CUDA graph; here its compiled step
    alone, with Inductor's CPU kernels)."""
    model, prompt, greedy = models["minGPT"], [3, 1, 4, 1, 5], pico.SamplingRule(temperature=0)
    decoder = pico.StaticDecoder(model, compile=True)
    assert (pico.generate_ids(decoder, prompt, 6, greedy)
            == pico.generate_ids(model, prompt, 6, greedy, use_cache=False))


def test_decoding_model_on_a_gpu_is_the_graph_decoder_compiled_when_asked(pico, models, monkeypatch):
    """What decoding_model builds for CUDA (the decoder itself is tested on a GPU in test_cuda):
    the CUDA-graph StaticDecoder, its step compiled only with compile (--generate --compile)."""
    built = []
    monkeypatch.setattr(pico, "StaticDecoder", type("Recorder", (), {
        "supports": staticmethod(lambda model: True),
        "__init__": lambda self, model, **kwargs: built.append(kwargs)}))
    monkeypatch.setattr(pico, "has_bf16_units", lambda device: device.type == "cuda")
    model = next(m for m in models.values() if isinstance(m, pico.TransformerModel))
    pico.decoding_model(model, "cuda")
    pico.decoding_model(model, "cuda", num_tokens=30)
    pico.decoding_model(model, "cuda", compile=True, num_tokens=30)    # a size of compiled_capacity
    pico.decoding_model(model, "cuda", dtype="float32")                # --dtype float32
    compiled = pico.compiled_capacity(30, model.config.block_size)
    assert compiled == min(64, model.config.block_size)     # never past the block size
    assert built == [dict(dtype=torch.bfloat16, graphs=True, compile=False, capacity=None),
                     dict(dtype=torch.bfloat16, graphs=True, compile=False, capacity=30),
                     dict(dtype=torch.bfloat16, graphs=True, compile=True, capacity=compiled),
                     dict(dtype=torch.float32, graphs=True, compile=False, capacity=None)]


def test_prompt_decoder_sizes_the_static_decoders_caches_to_prompt_and_new_tokens(pico, monkeypatch):
    """Every decoding step attends over all of a static cache's slots, so a model made for
    131,072 positions must not get caches that long for a 12-token sample."""
    tokenizer = pico.ByteTokenizer()
    config = pico.TransformerConfig(vocab_size=tokenizer.vocab_size, block_size=131_072,
                                    d_model=16, n_heads=2, n_blocks=2, pos_emb="rope")
    model = pico.TransformerModel(config)
    built = []

    def decoder_on_the_cpu(model, device, compile=False, num_tokens=None, dtype=None):
        built.append(pico.StaticDecoder(model, capacity=num_tokens))
        return built[-1]

    monkeypatch.setattr(pico, "decoding_model", decoder_on_the_cpu)
    decoder = pico.prompt_decoder(model, tokenizer, "abcab", 7, "cuda")
    generation = pico.generate_text(model, tokenizer, "abcab", 7, pico.SamplingRule(temperature=0),
                                    decoder=decoder)
    assert [cache.keys.shape[2] for cache in built[0].caches] == [5 + 7] * 2
    assert generation.token_ids == pico.generate_ids(model, tokenizer.encode("abcab"), 7,
                                                     pico.SamplingRule(temperature=0), use_cache=False)
    with pytest.raises(ValueError, match="13 positions exceed the decoder's 12"):
        built[0].forward_incremental(torch.zeros(1, 1, dtype=torch.long), 12)


def test_decoding_model_is_the_model_itself_off_the_gpu(pico, models):
    for model in models.values():
        assert pico.decoding_model(model, "cpu") is model


def test_a_bf16_static_decoder_never_holds_a_float32_copy_of_the_weights(pico, models):
    """Its weights are made in bf16 and cast as they are copied in: the float32 memory it
    allocates is the RoPE buffers' and the like, not a second float32 model (which, beside the
    model itself, would not fit a 3B model's decoding on a 24 GB GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Float32Allocations(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func.__name__.startswith(("empty", "new_empty")) and out.dtype == torch.float32
                    and out.device.type != "meta"):           # meta tensors hold no memory
                Float32Allocations.bytes += out.numel() * 4
            return out

    model = models["GPT-oss"]
    weights = sum(p.numel() * 4 for p in model.parameters())
    with Float32Allocations():
        decoder = pico.StaticDecoder(model, dtype=torch.bfloat16)
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    assert Float32Allocations.bytes < 0.05 * weights


def test_a_compiled_decoder_takes_a_few_cache_sizes_for_every_text_length(pico):
    """torch.compile makes code per shape and stops after 8 shapes in a process: a compiled
    decoder's caches come in powers of two from 64 up to the block size, each holding the text."""
    sizes = {pico.compiled_capacity(n, 1024) for n in range(1, 1025)}
    assert sizes == {64, 128, 256, 512, 1024}
    assert all(n <= pico.compiled_capacity(n, 1024) for n in range(1, 1025))
    assert pico.compiled_capacity(100, 96) == 96          # never past the block size


class Recorder(torch.nn.Module):
    """A stand-in model: it always predicts token 3 (end-of-text, the last id, from its
    `eot_after`-th call), and records the token ids it was fed."""

    def __init__(self, vocab: int = 8, eot_after: int | None = None):
        super().__init__()
        self.vocab, self.eot_after, self.fed = vocab, eot_after, []

    def forward_incremental(self, tokens, state):
        self.fed.append(tokens[:, 0].tolist())
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab)
        ending = self.eot_after is not None and len(self.fed) >= self.eot_after
        logits[..., self.vocab - 1 if ending else 3] = 10.0
        return logits, (state or 0) + 1


@pytest.mark.parametrize("eot_after", [None, 3])
def test_on_token_sees_each_new_id_as_it_is_drawn(pico, eot_after):
    seen = []
    ids = pico.generate_ids(Recorder(eot_after=eot_after), [1, 2], 4,
                            pico.SamplingRule(temperature=0), eot_id=7, on_token=seen.append)
    assert seen == ids[2:] == ([3, 3, 3, 3] if eot_after is None else [3, 3, 7])


def test_an_empty_prompt_starts_from_end_of_text(pico):
    """The model is asked to begin a document: it reads <|endoftext|>, not id 0 (a NUL byte)."""
    model = Recorder()
    ids = pico.generate_ids(model, [], 2, pico.SamplingRule(temperature=0), eot_id=7)
    assert model.fed[0] == [7] and ids[0] == 7


def test_generated_text_leaves_out_the_end_of_text_it_stopped_at(pico):
    """A trained BPE decodes <|endoftext|> as its 13 characters: the text must stop before it."""
    tokenizer = pico.TrainedBPETokenizer({i: bytes([i]) for i in range(256)}, [], 257)   # eot 256
    generation = pico.generate_text(Recorder(vocab=257, eot_after=2), tokenizer, "ab", 5,
                                    pico.SamplingRule(temperature=0))
    assert generation.token_ids[-1] == tokenizer.eot_id
    assert generation.new_text == "\x03" and generation.text == "ab\x03"


@pytest.mark.parametrize("training", [False, True])
def test_generation_leaves_the_model_in_the_mode_it_found(pico, training):
    """Sampling runs in eval mode (no dropout); a caller's training model stays in training."""
    model = Recorder().train(training)
    pico.generate_ids(model, [1], 2, pico.SamplingRule(temperature=0))
    assert model.training is training


def test_every_rule_of_the_sampling_sweep_has_a_label_of_its_own(pico):
    """The labels name the rules in the run log, the console and the sampling sweep's rows: a
    temperature below 1 must show."""
    assert pico.SamplingRule(temperature=0.7, top_p=1.0).label == "top-p 1, T 0.7"
    assert pico.SamplingRule(temperature=0.8, top_k=5).label == "top-p 1, top-k 5, T 0.8"
    assert pico.SamplingRule(temperature=0, top_k=5).label == "greedy"
    labels = [rule.label for rule in pico.SAMPLING_SWEEP_RULES]
    assert len(set(labels)) == len(labels)


class WrittenPieces:
    """A stream that keeps each write apart, as a terminal would show them one by one."""

    def __init__(self):
        self.pieces = []

    def write(self, text):
        self.pieces.append(text)

    def flush(self):
        pass

    def isatty(self):
        return False


class PieceTokenizer:
    """Token i is pieces[i]; decode joins them as `join` says (a decoder's own rules), and
    records how many ids each call decoded; encode matches pieces greedily, longest first."""
    eot_id = 99

    def __init__(self, pieces, join=lambda pieces: "".join(pieces)):
        self.pieces, self.join, self.decoded = pieces, join, []

    def decode(self, ids):
        self.decoded.append(len(ids))
        return self.join([self.pieces[i] for i in ids])

    def encode(self, text):
        ids = []
        while text:
            i = max((i for i, piece in enumerate(self.pieces) if text.startswith(piece)),
                    key=lambda i: len(self.pieces[i]))
            ids.append(i)
            text = text[len(self.pieces[i]):]
        return ids


def streamed(pico, tokenizer, ids, prompt=""):
    """What TextStream wrote after each id (the prompt first), and the whole."""
    out = WrittenPieces()
    stream = pico.TextStream(tokenizer, prompt, out)
    after = [list(out.pieces)]
    for token_id in ids:
        stream.add(token_id)
        after.append(list(out.pieces))
    stream.finish()
    return ["".join(pieces) for pieces in after], "".join(out.pieces)


def test_generated_text_is_written_as_its_tokens_come(pico, gpt2):
    """Each token's text as it is drawn; a character split over byte tokens once its last byte
    came; the end-of-text written as nothing; the whole ends as generate_text's text."""
    text = "Once upon a time, a café. 日本\nThe end"
    ids = gpt2.encode(text)
    assert len(ids) > len(text.split())       # é and 日本 take tokens of their bytes
    after, whole = streamed(pico, gpt2, ids + [gpt2.eot_id], prompt="Story:")
    assert whole == "Story:" + text + "\n"
    assert after[0] == "Story:" and after[1] == "Story:Once" and after[-1] == "Story:" + text
    for earlier, later in zip(after, after[1:]):
        assert later.startswith(earlier) and "\ufffd" not in later
    assert after.count("Story:" + text) == 2   # the last token's text, then nothing for <eot>


def test_bytes_of_one_character_wait_for_its_last_byte(pico):
    ids = list("é日".encode("utf-8")) + [ord("!")]
    after, whole = streamed(pico, pico.ByteTokenizer(), ids)
    assert after == ["", "", "é", "é", "é", "é日", "é日!"] and whole == "é日!\n"


def test_a_space_waits_for_what_follows_as_a_decoder_may_join_across_it(pico):
    """A decoder that writes "Hello ." as "Hello." (clean-up of spaces before punctuation):
    the space is held until the next token says whether it stays."""
    tokenizer = PieceTokenizer(["Hello", " ", ".", " world"],
                               lambda pieces: "".join(pieces).replace(" .", "."))
    after, whole = streamed(pico, tokenizer, [0, 1, 2, 3])
    assert after == ["", "Hello", "Hello", "Hello.", "Hello. world"]
    assert whole == "Hello. world\n"


def sentencepiece(pieces):
    """SentencePiece's decoder: ▁ is a space, and a text's leading one is dropped."""
    return "".join(pieces).replace("▁", " ").removeprefix(" ")


def test_a_continuation_keeps_the_leading_space_a_decoder_drops_at_a_texts_start(pico):
    """Decoded on its own, a continuation's first token "▁on" would lose its space ("the cat
    saton"), and so would each token decoded afresh after the one before."""
    tokenizer = PieceTokenizer(["▁the", "▁cat", "▁sat", "▁on", "\n", "▁mat"], sentencepiece)
    tokenizer.encode = lambda text: [0, 1, 2]          # what "the cat sat" reads as
    prompt = sentencepiece(["▁the", "▁cat", "▁sat"])
    assert prompt == "the cat sat"
    after, whole = streamed(pico, tokenizer, [3, 0, 4, 5], prompt=prompt)
    assert after == ["the cat sat", "the cat sat on", "the cat sat on the",
                     "the cat sat on the\n", "the cat sat on the\n mat"]
    assert whole == "the cat sat on the\n mat\n"


@pytest.mark.parametrize("in_prompt", [0, 10])
def test_tokens_that_read_as_nothing_keep_the_text_before_as_context(pico, in_prompt):
    """Special tokens (decoded as nothing) between "the" and "▁mat", generated or ending the
    prompt (a chat template's): however many, "▁mat" is read after "the", and keeps its
    space."""
    tokenizer = PieceTokenizer(["▁the", "<s>", "▁mat"],
                               lambda pieces: sentencepiece([p for p in pieces if p != "<s>"]))
    tokenizer.encode = lambda text: [0] + [1] * in_prompt
    _, whole = streamed(pico, tokenizer, [1] * (20 - in_prompt) + [2], prompt="the")
    assert whole == "the mat\n"


@pytest.mark.parametrize("held", ["", " ", "\ufffd", "<s>"])
def test_each_tokens_decoding_stays_short_however_long_the_text(pico, held):
    """A continuation decoded whole at every token would cost the square of its length: also
    through long runs of what is held back (spaces, bytes of no character, special tokens
    read as nothing), written out after 32 tokens."""
    tokenizer = PieceTokenizer(["a", "b", held], lambda pieces: "".join(pieces).replace("<s>", ""))
    ids = ([0, 1] + [2] * 100) * 5 if held else [0, 1] * 500
    _, whole = streamed(pico, tokenizer, ids)
    assert max(tokenizer.decoded) <= pico.HELD_TOKENS + pico.CONTEXT_IDS   # held, context
    assert whole == tokenizer.decode(ids) + "\n"


def test_an_interrupt_ends_the_text_with_what_was_held_back(pico):
    """Ctrl-C after the first byte of "é": the text ends as a shorter run would print it."""
    out = WrittenPieces()
    stream = pico.TextStream(pico.ByteTokenizer(), "x", out)
    for token_id in b"a\xc3":
        stream.add(token_id)
    stream.finish()
    assert "".join(out.pieces) == "xa\ufffd\n" == "x" + pico.ByteTokenizer().decode(b"a\xc3") + "\n"


def test_a_decoder_that_rewrites_earlier_text_leaves_the_pieces_written(pico, capsys):
    """Text that a later token changes (a byte-fallback decoder turns a run of byte tokens
    into U+FFFD once a character in it is cut off) cannot be taken back: the pieces written
    stand, each read after the tokens before it, and nothing is written twice."""
    tokenizer = PieceTokenizer(["ab", "c"], lambda pieces: "".join(pieces).replace("abc", "xyz"))
    _, whole = streamed(pico, tokenizer, [0, 1])
    assert whole == "abc\n" and capsys.readouterr().err == ""


def test_a_text_rewritten_for_long_is_written_out_after_32_tokens(pico):
    """Text rewritten for good ("b" read as "B" once a "c" follows the space held after it)
    waits 32 tokens at most for a later token to agree, then what follows the pieces written
    is written: no decoding grows with the text, and nothing is written twice."""
    tokenizer = PieceTokenizer(["a", "b ", "c"], lambda pieces: "".join(pieces).replace("b c", "B c"))
    after, whole = streamed(pico, tokenizer, [0, 1] + [2] * 100)
    assert max(tokenizer.decoded) <= pico.HELD_TOKENS + pico.CONTEXT_IDS
    assert after[2] == after[32] == "ab" and after[33] == "ab " + "c" * 31
    assert whole == "ab " + "c" * 100 + "\n"


def byte_fallback_tokenizer(pico):
    """Llama 2's kind of tokenizer.json: SentencePiece's "▁", and a character no token has
    spelled in byte tokens <0xNN>, which the decoder reads back as UTF-8 (a run of bytes that
    is no valid UTF-8 all as U+FFFD)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in ["▁", "▁the", "▁cat", "x", "ok", ".", "\n"]:
        vocab[token] = len(vocab)
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    return pico.HFTokenizer(hf, hf.get_vocab_size(), 2, "byte_fallback")


def test_a_character_in_byte_tokens_after_another_reads_as_itself(pico):
    """Read after only the last byte of "中", "文"'s bytes would be one broken run with it
    (U+FFFD for each): the context goes back to a whole character."""
    tokenizer = byte_fallback_tokenizer(pico)
    for prompt, continuation in [("the cat", "中文x"), ("中", "文x"), ("the", "éé.")]:
        ids = tokenizer.encode(prompt + continuation)[len(tokenizer.encode(prompt)):]
        assert pico.decode_continuation(tokenizer, tokenizer.encode(prompt), ids) == continuation
        assert streamed(pico, tokenizer, ids, prompt)[1] == prompt + continuation + "\n"


@pytest.mark.parametrize("name", ["gpt2", "byte", "metaspace", "bytelevel", "byte_fallback"])
def test_streamed_text_is_the_text_decoded_whole_for_random_tokens(pico, gpt2, name):
    """Random ids (bytes cut off, special tokens, spaces before punctuation) through GPT-2's
    tokenizer, the byte tokenizer and tokenizer.json's SentencePiece-like (Metaspace), byte-level
    and byte-fallback decoders: streamed, the prompt and generate_text's continuation exactly;
    and that continuation is what the prompt's ids and the new ones decode to together, where
    those begin with the prompt (a byte-fallback run broken across the join reads otherwise)."""
    import random
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = ["the cat sat on the mat\nand then café 日本 ok.", "Hello , world ! it 's fine\n\n end"]
    if name == "byte_fallback":
        tokenizer = byte_fallback_tokenizer(pico)
    elif name in ("metaspace", "bytelevel"):
        hf = Tokenizer(models.BPE(unk_token="<unk>" if name == "metaspace" else None))
        kind = pre_tokenizers.Metaspace() if name == "metaspace" else pre_tokenizers.ByteLevel(
            add_prefix_space=False)
        hf.pre_tokenizer, hf.decoder = kind, (decoders.Metaspace() if name == "metaspace"
                                               else decoders.ByteLevel())
        hf.train_from_iterator(texts * 20, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<unk>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if name == "bytelevel" else []))
        tokenizer = pico.HFTokenizer(hf, hf.get_vocab_size(), hf.token_to_id("</s>"), name)
    else:
        tokenizer = gpt2 if name == "gpt2" else pico.ByteTokenizer()
    vocab = min(300, getattr(tokenizer, "vocab_size", 300))
    draw = random.Random(0)
    for _ in range(100):
        prompt = draw.choice(["", "the cat", "Hello ,", "日"])
        ids = [draw.randrange(vocab) for _ in range(draw.randrange(1, 30))]
        _, whole = streamed(pico, tokenizer, ids, prompt)
        new_ids = [i for i in ids if i != tokenizer.eot_id]
        prompt_ids = tokenizer.encode(prompt)
        continuation = pico.decode_continuation(tokenizer, prompt_ids, new_ids)
        expected = prompt + continuation + "\n"
        if name == "byte_fallback" and "\ufffd" in expected:
            # A run of bytes cut off reads as U+FFFD whole, a U+FFFD per byte, also for the
            # characters of it written before: those pieces stand, and nothing comes twice
            clean = expected.index("\ufffd")
            assert whole[:clean] == expected[:clean] and len(whole) <= len(expected), (prompt, ids)
        else:
            assert whole == expected, (prompt, ids)
        together, alone = tokenizer.decode(prompt_ids + new_ids), tokenizer.decode(prompt_ids)
        if together.startswith(alone):
            assert together[len(alone):] == continuation, (prompt, ids)
