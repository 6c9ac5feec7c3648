"""Resource accounting (Appendix D): parameters, FLOPs and memory per component."""

import pytest
import torch


@pytest.mark.parametrize("preset", ["pico", "minGPT", "GPT2-small", "GPT-oss", "Llama3-lite", "speedrun"])
@pytest.mark.parametrize("extra", [[], ["--norm_position", "post", "--tie_weights", "false"],
                                   ["--pos_emb", "learned", "--norm", "layernorm", "--ffn", "gelu"],
                                   ["--n_experts", "3", "--ffn", "swiglu", "--attention_sinks", "true"],
                                   ["--attention", "linear"],
                                   ["--attention", "gated_linear", "--linear_attention_gate", "fixed"],
                                   ["--attention", "gated_linear", "--n_experts", "0"],
                                   ["--head_size", "24", "--qk_norm", "true"],
                                   ["--ffn", "relu2", "--value_embeddings", "true", "--unet_skips",
                                    "true", "--zero_init_proj", "true", "--logit_softcap", "30"]])
def test_accounted_parameters_equal_the_built_model(pico, configure, preset, extra):
    config = configure("--transformer_variant", preset, "--d_model", "64", "--n_heads", "4",
                       "--n_blocks", "2", "--block_size", "32", *extra).models.transformer
    config = pico.dataclasses.replace(config, vocab_size=300)
    account = pico.transformer_accounting(config, 32)
    assert account["total_parameters"] == pico.count_parameters(pico.TransformerModel(config))
    assert sum(account["parameters"].values()) == account["total_parameters"]


def test_gpt2_small_has_its_published_parameter_count(pico):
    account = pico.transformer_accounting(pico.gpt2_shape_config("gpt2-small"), 1024)
    assert account["total_parameters"] == 124_439_808


@pytest.mark.parametrize("extra", [[], ["--head_size", "24", "--n_kv_heads", "2"],
                                   ["--n_experts", "4", "--experts_per_token", "2"]])
def test_forward_flops_match_a_counted_forward_pass(pico, configure, extra):
    """Count the multiply-adds of every matmul in a real forward pass with torch's FLOP counter
    (it sees aten's matmuls: the plain model, not Appendix A's oneDNN linears). A mixture of
    experts spends its router's matmul and the 2 experts each token is sent to, of 4."""
    from torch.utils.flop_counter import FlopCounterMode
    config = configure("--d_model", "64", "--n_heads", "4", "--n_blocks", "2",
                       "--block_size", "32", "--attention_impl", "math", *extra).models.transformer
    config = pico.dataclasses.replace(config, vocab_size=300)
    model = pico.TransformerModel(config)
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 300, (32, 1)))
    accounted = pico.transformer_accounting(config, 32)["total_forward_flops"]
    assert counter.get_total_flops() == accounted


def test_linear_attention_flops_per_token_do_not_grow_with_the_context(pico, configure):
    """Softmax attention reads the whole context for each token, 12 FLOPs a layer, head and
    head dimension per position of it (forward and backward); linear attention reads and
    updates a head_dim-wide state instead, whatever the context."""
    def flops(attention, context):
        config = configure("--d_model", "64", "--n_heads", "4", "--n_blocks", "2",
                           "--attention", attention).models.transformer
        return pico.training_flops_per_token(pico.TransformerModel(config), context)
    assert flops("linear", 64) == flops("linear", 4096)
    assert flops("softmax", 4096) - flops("softmax", 64) == 12 * 2 * 4 * 16 * (4096 - 64)
    assert flops("softmax", 16) == flops("linear", 64)      # the state: head_dim 16 wide


def test_every_example_keeps_its_logits_and_their_softmax(pico):
    """The logits and the softmax the loss takes of them: two floats per position and
    vocabulary entry, so 8 bytes more per position for each entry the vocabulary grows by."""
    config = pico.gpt2_shape_config("gpt2-small")
    def activations(vocab_size):
        account = pico.transformer_accounting(pico.dataclasses.replace(config, vocab_size=vocab_size), 256)
        return account["training_memory_bytes"]["activations_per_example"]
    assert activations(50_357) - activations(50_257) == 4 * 2 * 256 * 100


def test_memory_grows_with_context_and_adamw_doubles_the_weights(pico):
    config = pico.gpt2_shape_config("gpt2-small")
    short, long = (pico.transformer_accounting(config, t)["training_memory_bytes"] for t in (256, 1024))
    assert long["activations_per_example"] > 4 * short["activations_per_example"] * 0.9
    assert short["adamw_state"] == 2 * short["parameters"] == 2 * short["gradients"]


def test_accounting_command_prints_every_preset_and_gpt2_shape(run_main):
    status, out, err = run_main("--accounting", "all")
    assert status == 0, err
    for name in ("pico", "Llama3-lite", "gpt2-small", "gpt2-xl"):
        assert f"{name}:" in out
    assert run_main("--accounting", "gpt9")[0] == 2


def test_accounting_names_are_read_as_written_and_a_case_that_fits_two_is_refused(run_main):
    """GPT2-small is a preset and gpt2-small GPT-2's size (85 M against 124 M parameters):
    another case of the letters fits both, and was read as the preset; a preset in another
    case that fits nothing else is still found."""
    sizes = {}
    for name in ("GPT2-small", "gpt2-small", "gpt-OSS"):
        status, out, err = run_main("--accounting", name)
        assert status == 0, err
        sizes[name] = out.split(":")[0]
    assert sizes == {"GPT2-small": "GPT2-small", "gpt2-small": "gpt2-small", "gpt-OSS": "GPT-oss"}
    status, _, err = run_main("--accounting", "GPT2-SMALL")
    assert status == 2 and "names both the preset GPT2-small and GPT-2's size gpt2-small" in err


def test_accounting_is_not_held_to_the_k_gram_models_rules(run_main):
    """It counts Transformers only: --block_size 1 was refused as no larger than --kgram_k,
    a rule of the k-gram model that the default --models names."""
    status, out, err = run_main("--accounting", "gpt2-small", "--block_size", "1")
    assert status == 0 and "per 1-token sequence" in out, err


def test_accounting_notes_the_flags_of_training_and_text_it_does_not_read(run_main):
    """It reads --block_size and --batch_size (a step's memory) and the Transformer's flags;
    the training command with --accounting added printed the table and said nothing of the
    epochs or the text it had been given."""
    status, out, err = run_main("--accounting", "pico", "--epochs", "3", "--input_files",
                                "3seqs.txt", "--batch_size", "4", "--block_size", "32")
    assert status == 0 and "per 32-token sequence" in out, err
    assert err.strip().splitlines() == [
        "pico-llm: note: --accounting trains nothing and reads no text, so --epochs, "
        "--input_files are not read"]
    status, _, err = run_main("--accounting", "pico", "--batch_size", "4")
    assert status == 0 and err == "", err


@pytest.mark.parametrize("flags", [["--models", "kgram_mlp_seq", "--kgram_variant", "onehot"],
                                   ["--models", "kgram_mlp_seq", "--kgram_variant", "embedding",
                                    "--num_inner_mlp_layers", "2"],
                                   ["--models", "kgram_mlp_seq", "--kgram_variant", "conv"],
                                   ["--models", "lstm_seq", "--lstm_layers", "3"],
                                   ["--models", "transformer", "--pos_emb", "learned"]],
                         ids=["onehot", "embedding", "conv", "lstm", "transformer"])
def test_parameters_counted_from_the_config_equal_the_built_model(pico, configure, flags):
    models = configure(*flags, "--embed_size", "24", "--kgram_k", "4", "--d_model", "32",
                       "--n_heads", "2", "--block_size", "16").models
    config = models.config_of(models.names[0])
    built = pico.build_model(config, vocab_size=300, seed=0)
    assert pico.parameter_count(config, 300) == pico.count_parameters(built)


def test_memory_sizes_read_as_mib_gib_or_a_power_of_ten_whatever_their_length(pico):
    """A damaged file's sizes can run past a float's range (10**308): they are written as a
    power of ten, where dividing them as floats would fail (OverflowError)."""
    assert pico.memory_size(3 << 20) == "3.0 MiB" and pico.memory_size(5 << 30) == "5.0 GiB"
    assert pico.memory_size(2**30) == "1.0 GiB" and pico.memory_size(2**30 - 1).endswith(" MiB")
    assert pico.memory_size(2**200) == "10^51 GiB"
    assert pico.memory_size(10**1000) == "10^991 GiB"


def test_the_memory_check_counts_16_bytes_a_parameter_and_the_grouped_kv_cache(pico, configure,
                                                                             monkeypatch):
    """Exactly enough memory passes, one byte less is refused: 16 bytes a parameter (weights,
    gradients, AdamW's two moments) and the KV cache of the key/value heads alone (grouped
    queries share them), in float32 at --block_size positions."""
    models = configure("--models", "transformer", "--d_model", "32", "--n_heads", "4",
                       "--n_kv_heads", "2", "--n_blocks", "3").models
    parameters = pico.parameter_count(models.transformer, 257)
    needed = 16 * parameters + 2 * 3 * 2 * 8 * 64 * 4     # keys and values, 3 blocks, 2 heads of 8
    for available, fits in ((needed, True), (needed - 1, False)):
        monkeypatch.setattr(pico, "memory_available", lambda device: available)
        if fits:
            pico.check_models_fit_in_memory(models, 257, 64, torch.device("cpu"))
        else:
            with pytest.raises(pico.UserError, match="transformer needs about"):
                pico.check_models_fit_in_memory(models, 257, 64, torch.device("cpu"))


def test_a_model_larger_than_memory_is_refused_naming_its_size_flag(pico, configure, monkeypatch):
    monkeypatch.setattr(pico, "memory_available", lambda device: 8 << 30)
    device = torch.device("cpu")
    fits = configure("--models", "kgram_mlp_seq,lstm_seq,transformer").models
    pico.check_models_fit_in_memory(fits, 50257, 64, device)
    wide = configure("--models", "kgram_mlp_seq", "--kgram_k", "1000", "--embed_size", "1024",
                     "--block_size", "1001").models                # 1000 x 1024 x 1024 weights
    with pytest.raises(pico.UserError, match=r"kgram_mlp_seq needs about .* lower --kgram_k "
                                             r"\(1,000\) or --embed_size \(1,024\)"):
        pico.check_models_fit_in_memory(wide, 257, 1001, device)
    # 2 (keys, values) x 3 blocks x 4 heads x 32 dims x 4 bytes = 3 KiB per position
    long = configure("--models", "transformer", "--block_size", "4000000").models
    with pytest.raises(pico.UserError, match=r"KV cache.*lower --block_size \(4,000,000\)"):
        pico.check_models_fit_in_memory(long, 257, 4_000_000, device)
    # Learned positions (minGPT's) blame --block_size only where their table is most of it.
    for flags, advice in ((["--d_model", "120000"], r"lower --d_model, --n_blocks or --d_ff$"),
                          (["--block_size", "10000000"], r"lower --block_size \(10,000,000\)$")):
        config = configure("--models", "transformer", "--transformer_variant", "minGPT", *flags)
        with pytest.raises(pico.UserError, match=advice):
            pico.check_models_fit_in_memory(config.models, 257, config.data.block_size, device)
    # 4 layers x 4 gates x 2 x 20,000**2 weights; 12 blocks of 12 x 8,192**2
    deep = configure("--models", "lstm_seq", "--embed_size", "20000", "--lstm_layers", "4").models
    with pytest.raises(pico.UserError, match=r"lstm_seq needs about .* lower --embed_size "
                                             r"\(20,000\) or --lstm_layers \(4\)$"):
        pico.check_models_fit_in_memory(deep, 257, 64, device)
    # Experts multiply the feed-forward layers: named first. A cache under 0.1 MiB goes unsaid
    # (it had been "a 0.0 MiB KV cache").
    for flags, cache, advice in (
            (["--d_model", "8192", "--n_heads", "8", "--n_blocks", "12"], " and a .* KV cache",
             "--d_model, --n_blocks or --d_ff"),
            (["--block_size", "16", "--n_experts", "1024", "--d_ff", "1000000"], "",
             r"--n_experts \(1,024\), --d_ff, --d_model or --n_blocks")):
        config = configure("--models", "transformer", *flags)
        with pytest.raises(pico.UserError, match=rf"transformer needs about .* GiB \([0-9,]+ "
                           rf"parameters at 16 bytes for training{cache}\), more than the 8.0 "
                           rf"GiB of memory here; lower {advice}$"):
            pico.check_models_fit_in_memory(config.models, 257, config.data.block_size, device)
    # a --tokenizer bpe:N asking for more ids than memory holds rows: the vocabulary is named
    for models in (fits, configure("--models", "lstm_seq").models):
        with pytest.raises(pico.UserError, match=r"its 99,999,999,999-token vocabulary is what "
                                                 r"does not fit; choose a smaller --tokenizer"):
            pico.check_models_fit_in_memory(models, 99_999_999_999, 64, device)
