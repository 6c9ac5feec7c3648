"""Appendix A's compiled forms: each equal to the Part I piece it stands in for, and the
compiled training step free of graph breaks, data-dependent shapes and per-step recompiles."""

import functools

import contextlib
import io

import pytest
import torch

from test_models import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Every attention kind and the presets whose blocks differ (GPT-oss: window, sinks, experts).
COMPILED_MODELS = {
    "pico": ["--transformer_variant", "pico"],
    "GPT2-small": ["--transformer_variant", "GPT2-small"],
    "GPT-oss": ["--transformer_variant", "GPT-oss", "--sliding_window", "4"],
    "linear": ["--transformer_variant", "pico", "--attention", "linear"],
    "gated_linear": ["--transformer_variant", "pico", "--attention", "gated_linear"],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_complex_rope_product_equals_the_real_formula_and_its_gradient(pico, dtype,
                                                                          monkeypatch):
    """Appendix A's one complex product against section 1.2's (a cos - b sin, a sin + b cos),
    on a transposed (B, H, T, D) view as attention passes it: values and gradients."""
    torch.manual_seed(0)
    rotary = pico.RotaryEmbedding(16, theta=500.0)
    cos, sin = rotary.angles(torch.arange(5, 12))
    x = torch.randn(2, 7, 3, 16).to(dtype).transpose(1, 2).requires_grad_()   # (B, H, T, D)
    grad_out = torch.randn(2, 3, 7, 16).to(dtype)
    results, complex_views = [], []
    view_as_complex = torch.view_as_complex
    monkeypatch.setattr(torch, "view_as_complex", lambda t: complex_views.append(t.shape) or
                        view_as_complex(t))
    for rotate in (pico.RotaryEmbedding.rotate, pico.rotate_pairs_complex):
        y = rotate(x, cos, sin)
        results.append((y, *torch.autograd.grad(y, x, grad_out)))
    assert complex_views == [(2, 3, 7, 8, 2)]         # the complex product did run, once
    (real, real_grad), (complex_, complex_grad) = results
    assert real.dtype == complex_.dtype == complex_grad.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(real.float(), complex_.float(), atol=tolerance)
    assert torch.allclose(real_grad.float(), complex_grad.float(), atol=tolerance)
    assert not torch.allclose(real, x)                                          # it did turn


def test_a_model_sped_up_gives_the_plain_models_logits(pico):
    """speed_up's complex RoPE (with PyTorch's own matmul and loss) changes no logit."""
    model = tiny_model(pico, "transformer", *COMPILED_MODELS["GPT-oss"]).eval()
    tokens = torch.randint(0, VOCAB, (9, 2), generator=torch.Generator().manual_seed(0))
    plain = model(tokens)
    pico.speed_up(model, pico.SpeedConfig(loss="plain", cpu_matmul="torch"), torch.device("cpu"))
    assert torch.allclose(model(tokens), plain, atol=1e-5)


@pytest.mark.parametrize("gate", [None, "fixed", "data"])
@pytest.mark.parametrize("length", [1, 5, 16, 37, 64])
def test_all_chunks_at_once_equal_the_loop_over_chunks(pico, gate, length):
    """Compiled code's linear attention (every chunk at once) against section 1's loop: the
    same outputs, final state and gradients (the carried-in state's too), for lengths shorter
    than a chunk, a whole number of chunks and neither, and decays down to -5 a token."""
    from test_architectures import random_recurrence
    inputs = [t.clone().requires_grad_() for t in random_recurrence(gate, T=length)]
    results = []
    for form in (pico.chunked_linear_attention, pico.all_chunks_linear_attention):
        y, final = form(*inputs)
        gradients = torch.autograd.grad((y.sin().sum() + final.cos().sum()), inputs)
        results.append((y, final, gradients))
    (y1, s1, g1), (y2, s2, g2) = results
    assert y2.shape == y1.shape == (2, 3, length, 5)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_segment_sums_add_each_stretch(pico):
    x = torch.tensor([1.0, 2.0, 4.0, 8.0])
    sums = pico.segment_sums(x)
    for n in range(4):
        for m in range(4):
            expected = x[m + 1:n + 1].sum() if m <= n else float("-inf")
            assert sums[n, m] == expected, (n, m)


def test_static_shape_experts_equal_the_sparse_layer(pico):
    """Same output, gradients, routing and usage counts; the static layer runs every expert on
    every position, weighted 0 where the router did not choose it."""
    torch.manual_seed(0)
    sparse = pico.MixtureOfExperts(16, 24, "clamped_swiglu", n_experts=4, experts_per_token=2,
                                   bias=True, dropout=0.0)
    static = pico.MixtureOfExperts(16, 24, "clamped_swiglu", 4, 2, True, 0.0)
    static.load_state_dict(sparse.state_dict())
    static.__class__ = pico.StaticShapeMixtureOfExperts
    x = torch.randn(5, 3, 16)
    outputs = []
    for layer in (sparse, static):
        layer.zero_grad()
        y = layer(x)
        (y.square().sum() + layer.routing.load_balancing_loss()).backward()
        outputs.append((y, [p.grad for p in layer.parameters()], layer.routing.chosen, layer.usage))
    (y1, g1, c1, u1), (y2, g2, c2, u2) = outputs
    assert torch.allclose(y1, y2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    assert torch.equal(c1, c2) and torch.equal(u1, u2) and u1.sum() == 15 * 2


def test_eager_experts_read_nothing_back_but_the_split_sizes(pico):
    """On a GPU, each eager mixture-of-experts layer makes the host wait once, for its experts'
    batch sizes (counts.tolist(), which is no operator and not seen here). No operator in its
    forward may wait too: torch.bincount reads the ids' range back first, .item() and
    .nonzero() their results (operators that do so on a GPU, recorded on the CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    waiting = {"aten._local_scalar_dense", "aten.bincount", "aten.nonzero", "aten.masked_select",
               "aten.is_nonzero", "aten.equal", "aten.unique_dim", "aten._unique2"}

    class Operators(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    layer = pico.MixtureOfExperts(16, 24, "clamped_swiglu", n_experts=4, experts_per_token=2,
                                  bias=True, dropout=0.0)
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0))
    with Operators() as operators:
        y = layer(x)
    assert "aten.index_add_" in operators.seen and not waiting & set(operators.seen)
    chosen = layer.routing.chosen.flatten()
    assert torch.equal(layer.usage, torch.bincount(chosen, minlength=4)) and y.shape == x.shape


@pytest.mark.parametrize("name", COMPILED_MODELS)
def test_compiled_training_loss_has_one_graph_and_no_breaks(pico, name):
    """torch._dynamo.explain over what a GPU compiles (model, output layer and loss): any graph
    break (a host sync such as .tolist(), a data-dependent shape, complex numbers) shows here."""
    model = tiny_model(pico, "transformer", *COMPILED_MODELS[name])
    pico.complex_rope(model)                           # as speed_up leaves it before compiling
    for module in model.modules():
        if type(module) is pico.MixtureOfExperts:
            module.__class__ = pico.StaticShapeMixtureOfExperts
    tokens = torch.randint(0, VOCAB, (16, 2))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(pico.FusedNextTokenLoss(model))(tokens, tokens,
                                                                      torch.full((16, 2), 1 / 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert "complex" not in explained.graphs[0].code           # Inductor has no complex codegen


def test_an_lstm_loss_breaks_its_compiled_graph_only_at_the_lstm(pico):
    """Dynamo cannot trace nn.LSTM, so a compiled LSTM loss has one break; the loss's own code
    (the experts' balancing term, which walked the model's modules, the LSTM's among them)
    must add none."""
    model = tiny_model(pico, "lstm_seq", "--lstm_layers", "2")
    tokens = torch.randint(0, VOCAB, (17, 2))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(pico.FusedNextTokenLoss(model))(tokens[:-1], tokens[1:],
                                                                      torch.full((16, 2), 1 / 32))
    assert explained.graph_break_count == 1, explained.break_reasons


@pytest.mark.parametrize("name", ["pico", "GPT-oss"])
def test_fused_loss_equals_the_written_out_loss(pico, name):
    """Appendix A's FusedNextTokenLoss (PyTorch's cross-entropy, what a GPU trains with) against
    section 3's NextTokenLoss: the same weighted sum of nats and the same gradients, the
    experts' load-balancing term included."""
    model = tiny_model(pico, "transformer", *COMPILED_MODELS[name])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (17, 3), generator=generator)
    weights = torch.rand(16, 3, generator=generator) / 48
    results = []
    for loss_module in (pico.NextTokenLoss(model), pico.FusedNextTokenLoss(model)):
        model.zero_grad()
        loss = loss_module(tokens[:-1], tokens[1:], weights)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (fused, fused_grads) = results
    assert fused == pytest.approx(plain, rel=1e-6)
    for a, b in zip(plain_grads, fused_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_loss_auto_is_chunked_on_a_cpu_for_a_large_vocabulary_and_fused_otherwise(pico):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    large = tiny_model(pico, "transformer", vocab_size=pico.CHUNKED_LOSS_MIN_VOCAB)
    small = tiny_model(pico, "transformer", vocab_size=pico.CHUNKED_LOSS_MIN_VOCAB - 1)
    assert type(pico.speed_up(large, pico.SpeedConfig(), cpu)) is pico.ChunkedNextTokenLoss
    assert type(pico.speed_up(small, pico.SpeedConfig(), cpu)) is pico.FusedNextTokenLoss
    assert pico.loss_kind("auto", cuda, 50257) == "fused"
    assert pico.loss_kind("plain", cuda, 50257) == "plain"
    assert pico.loss_kind("chunked", cpu, 10) == "chunked"
    # a module that is no whole model (its vocabulary unknown) counts as a large vocabulary
    assert pico.loss_kind("auto", cpu, None) == "chunked" and pico.loss_kind("auto", cuda, None) == "fused"
    assert set(pico.LOSS_MODULES) | {"auto"} == set(pico.LOSS_KINDS)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("name", ["GPT-oss", "gated_linear"])
def test_compiled_training_steps_equal_eager_without_recompiling(pico, monkeypatch, name, device):
    """compile_for_training's paths (on a GPU the whole loss module compiled, on a CPU the
    model's features; with experts, each block), traced on the CPU with the aot_eager backend
    (no code generation, so seconds): the same losses as eager training, and the same graphs
    from the first step on (one; with experts, one per kind of block), also across the run
    log's reading of the experts' usage (a compilation of GPT-oss costs a minute on a GPU) and
    through evaluation, which runs eagerly."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    flags = COMPILED_MODELS[name] + (["--n_blocks", "4"] if name == "GPT-oss" else [])  # 2 kinds
    models = [tiny_model(pico, "transformer", *flags) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    pico.complex_rope(models[1])                      # as speed_up leaves it before compiling
    torch._dynamo.reset()
    counters.clear()
    compiled = pico.compile_for_training(models[1], torch.device(device))  # the device's branch
    experts = name == "GPT-oss"
    if experts or device == "cpu":                    # the blocks or the features, in place
        assert compiled is None
        compiled = pico.FusedNextTokenLoss(models[1])
    else:
        assert isinstance(compiled.compiled, torch._dynamo.eval_frame.OptimizedModule)
    training = pico.TrainingConfig()
    optimizers = [pico.build_optimizer(m, training, torch.device("cpu")) for m in models]
    generator = torch.Generator().manual_seed(0)
    losses, graphs = [[], []], []
    for step in range(4):
        if step == 2:                                 # an epoch ends: the run log reads usage
            for model in models:
                pico.record_expert_usage(model, {}, 1, pico.Distributed(), torch.device("cpu"))
        tokens = torch.randint(0, VOCAB, (17, 2), generator=generator)
        batch = pico.Batch(tokens[:-1], tokens[1:], torch.ones(16, 2, dtype=torch.bool))
        for index, loss_model in enumerate((pico.NextTokenLoss(models[0]), compiled)):
            losses[index].append(pico.training_step(loss_model, optimizers[index], [(batch, True)],
                                                    32, 1.0))
        graphs.append(counters["stats"]["unique_graphs"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    kinds = len({block.attention.window for block in models[1].blocks}) if experts else 1
    assert graphs[0] == graphs[-1] == kinds, graphs
    if experts:                 # one compilation per kind of block, not one per block
        assert kinds == 2 < len(models[1].blocks)
    with torch.no_grad():       # evaluation, a shorter last batch too, runs the module eagerly
        for length in (16, 5):
            evaluated = compiled(tokens[:length], tokens[1:length + 1], torch.ones(length, 2))
            assert torch.isfinite(evaluated)
    assert counters["stats"]["unique_graphs"] == graphs[-1]


# The device picks the path only without experts (the whole loss compiled, or the model in
# place); a mixture of experts compiles its blocks on any device, so GPT-oss runs once.
@pytest.mark.parametrize("name, device", [("GPT-oss", "cpu"), ("pico", "cuda"), ("pico", "cpu"),
                                          ("gated_linear", "cuda"), ("gated_linear", "cpu")])
def test_compiled_training_takes_lines_modes_changing_lengths_in_two_graphs(pico, monkeypatch,
                                                                           name, device):
    """Lines mode pads a batch to its longest line, so the length changes every step: the
    compiled code takes the first length statically and then one graph for any length (one
    per kind of block with experts), not one per length; the training loop says which data it
    has (a stream's steps keep static shapes: the test above). Linear attention's chunks
    (16 tokens) take one graph more, for lengths of one chunk."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    # Two kinds of GPT-oss block take two blocks; one block of the others shows their graphs.
    flags = COMPILED_MODELS[name] + ["--n_blocks", "2" if name == "GPT-oss" else "1"]
    model = tiny_model(pico, "transformer", *flags, "--block_size", "64")
    pico.complex_rope(model)                          # as speed_up leaves it before compiling
    torch._dynamo.reset()
    counters.clear()
    compiled = pico.compile_for_training(model, torch.device(device), lengths_vary=True)
    loss_model = compiled or pico.FusedNextTokenLoss(model)
    for length in (16, 9, 12, 5, 14, 40, 23, 64, 37):
        tokens = torch.randint(0, VOCAB, (length + 1, 2))
        loss_model(tokens[:-1], tokens[1:], torch.ones(length, 2)).backward()
    kinds = 2 if name == "GPT-oss" else 1
    assert counters["stats"]["unique_graphs"] <= 2 * kinds + (name == "gated_linear")


@pytest.mark.parametrize("name", ["pico", "GPT-oss"])
def test_every_model_a_process_compiles_gets_compiled_code_of_its_own(pico, monkeypatch, name):
    """A sweep compiles one model after another in one process. PyTorch keeps at most
    recompile_limit versions (8) of a function's compiled code, and every model runs the same
    loss's forward (every GPT-oss the same block's): the models past the limit would train
    uncompiled, with only a warning. Here the limit is 2, and four widths each compile."""
    compiled_graphs = []

    def recording(graph_module, example_inputs):      # a backend: the traced graph, run as is
        compiled_graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    flags = COMPILED_MODELS[name] + (["--n_blocks", "4"] if name == "GPT-oss" else [])  # 2 kinds
    counts = []
    for width in (16, 24, 32, 40):
        model = tiny_model(pico, "transformer", *flags, "--d_model", str(width))
        pico.complex_rope(model)                      # as speed_up leaves it before compiling
        before = len(compiled_graphs)
        loss_model = (pico.compile_for_training(model, torch.device("cuda"))  # the GPU's branch
                      or pico.FusedNextTokenLoss(model))
        tokens = torch.randint(0, VOCAB, (17, 2))
        loss_model(tokens[:-1], tokens[1:], torch.ones(16, 2)).backward()
        counts.append(len(compiled_graphs) - before)
    assert counts == [2 if name == "GPT-oss" else 1] * 4, counts   # GPT-oss: a graph a block kind


def test_the_chunked_loss_compiled_on_a_gpu_stays_chunked(pico, monkeypatch):
    """--compile --loss chunked on a GPU: as on a CPU, the model's features compiled and the
    chunked loss run eagerly around them (compiled whole, the loss would hold all the logits
    that the chunks exist to spare), the same loss as section 3's."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    models = [tiny_model(pico, "transformer", *COMPILED_MODELS["pico"]) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    pico.complex_rope(models[1])                      # as speed_up leaves it before compiling
    counters.clear()
    assert pico.compile_for_training(models[1], torch.device("cuda"), loss="chunked") is None
    tokens = torch.randint(0, VOCAB, (17, 2))
    losses = [loss_module(tokens[:-1], tokens[1:], torch.full((16, 2), 1 / 32))
              for loss_module in (pico.NextTokenLoss(models[0]),
                                  pico.ChunkedNextTokenLoss(models[1]))]   # what speed_up returns
    assert counters["stats"]["unique_graphs"] == 1    # the features, compiled in place
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)


def test_speed_up_hands_whether_lengths_vary_to_compilation(pico, monkeypatch):
    seen = []
    monkeypatch.setattr(pico, "check_compile_available", lambda device: None)
    monkeypatch.setattr(pico, "compile_for_training",
                        lambda model, device, kind, lengths_vary=False: seen.append(lengths_vary))
    for lengths_vary in (True, False):
        model = tiny_model(pico, "transformer")
        pico.speed_up(model, pico.SpeedConfig(compile=True), torch.device("cpu"),
                      lengths_vary=lengths_vary)
    assert seen == [True, False]


def test_the_training_loop_tells_compilation_whether_lengths_vary(pico, run_main, monkeypatch):
    from conftest import TINY_RUN
    seen = []
    real = pico.speed_up
    monkeypatch.setattr(pico, "speed_up", lambda *args, **kwargs: seen.append(
        kwargs.get("lengths_vary")) or real(*args, **kwargs))
    for data_format in ("lines", "stream"):
        status, _, err = run_main(*TINY_RUN, "--models", "transformer", "--epochs", "1",
                                  "--data_format", data_format)
        assert status == 0, err
    assert seen == [True, False]


def test_compile_with_a_cache_folder_that_cannot_be_written_is_one_line(
        pico, run_main, monkeypatch, tmp_path):
    """Inductor's cache on any device; Triton's, which only a GPU's kernels use, on a GPU."""
    from conftest import TINY_RUN
    (tmp_path / "a_file").write_text("not a folder\n")
    unusable = tmp_path / "a_file" / "cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(unusable))
    status, _, err = run_main(*TINY_RUN, "--models", "transformer", "--compile")
    assert status == 2, err
    assert f"TORCHINDUCTOR_CACHE_DIR {unusable}" in err and "is not a directory" in err
    assert "set TORCHINDUCTOR_CACHE_DIR to another folder, or unset it" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(unusable))
    monkeypatch.setattr(pico, "compile_unavailable", lambda device: None)
    with pytest.raises(pico.UserError, match="TRITON_CACHE_DIR .* is not a directory"):
        pico.check_compile_available(torch.device("cuda"))
    pico.check_compile_available(torch.device("cpu"))


def test_an_unwritable_inductor_cache_is_one_line_without_compile_too(run_main, monkeypatch,
                                                                      tmp_path):
    """PyTorch makes Inductor's cache folder as the first optimizer is built, compiled or not:
    a folder that cannot be made was a traceback from inside torch.optim after the data loaded."""
    from conftest import TINY_RUN
    (tmp_path / "a_file").write_text("not a folder\n")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "a_file"))
    status, _, err = run_main(*TINY_RUN, "--models", "lstm_seq")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"TORCHINDUCTOR_CACHE_DIR {tmp_path / 'a_file'}:" in err and "is not a directory" in err


def test_compile_without_a_compiler_is_one_line(pico, run_main, monkeypatch, tmp_path):
    from conftest import TINY_RUN
    monkeypatch.setattr(pico.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    status, out, err = run_main(*TINY_RUN, "--models", "transformer", "--compile")
    assert status == 2
    assert "--compile cannot run here" in err and "C++ compiler" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()    # said before the text is read and tokenized
    monkeypatch.setenv("CXX", "/nonexistent/g++")           # Inductor would try it, and fail
    status, out, err = run_main(*TINY_RUN, "--models", "transformer", "--compile")
    assert status == 2 and "CXX='/nonexistent/g++' names no program" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # Inductor runs `$CXX --version` and needs it to work (a 104-line InductorError after the
    # data loaded, where a program that exists but fails was let through)
    monkeypatch.setattr(pico.shutil, "which", lambda name: f"/bin/{name}")
    for failing in ("false", "g++ -O2"):
        monkeypatch.setenv("CXX", failing)
        status, out, err = run_main(*TINY_RUN, "--models", "transformer", "--compile")
        assert status == 2 and f"`{failing} --version` failed" in err and "fix or unset CXX" in err
        assert len(err.strip().splitlines()) == 1
    monkeypatch.delenv("CXX")                        # the default compiler's --version fails

    def failing_run(*args, **kwargs):
        raise OSError(8, "Exec format error")
    monkeypatch.setattr(pico.subprocess, "run", failing_run)
    said = pico.compile_unavailable(torch.device("cpu"))
    assert "--version` failed" in said and said.endswith("(fix it, or set CXX to one that works)")


def test_compile_on_a_gpu_needs_triton_a_c_compiler_and_pythons_headers(pico, monkeypatch,
                                                                         tmp_path):
    """Triton builds each kernel's launcher with $CC, else gcc, else clang, against Python.h:
    without one the first compiled step was a long traceback ("Failed to find C compiler",
    "fatal error: Python.h: No such file or directory")."""
    gpu = torch.device("cuda", 0)
    real_find_spec = pico.importlib.util.find_spec
    monkeypatch.setattr(pico.importlib.util, "find_spec",
                        lambda name, *args: object() if name == "triton" else real_find_spec(name, *args))
    monkeypatch.delenv("CC", raising=False)
    found = {"gcc", "clang"}
    monkeypatch.setattr(pico.shutil, "which", lambda name: f"/usr/bin/{name}" if name in found else None)
    headers = tmp_path / "include"                         # Python's, the launchers include
    prefix = tmp_path / "prefix"    # Debian's posix_local scheme, which Triton reads as this one
    monkeypatch.setattr(pico.sysconfig, "get_paths", lambda scheme=None: {
        "include": str(prefix if scheme == "posix_prefix" else headers)})
    assert "need Python's C headers, and " + str(headers / "Python.h") + " is missing (install " \
        "python3-dev" in pico.compile_unavailable(gpu)
    for place in (prefix, headers):                        # either will do; the second stays
        place.mkdir()
        (place / "Python.h").write_text("/* the headers */\n")
        assert pico.compile_unavailable(gpu) is None
    (prefix / "Python.h").unlink()
    assert pico.compile_unavailable(gpu) is None
    found = {"clang"}                                      # macOS's, or a system without gcc
    assert pico.compile_unavailable(gpu) is None
    found = set()
    assert "GPU kernels need a C compiler (gcc or clang)" in pico.compile_unavailable(gpu)
    monkeypatch.setenv("CC", "/opt/cc")                    # Triton takes CC as it is
    assert "CC='/opt/cc' names no program" in pico.compile_unavailable(gpu)
    found = {"/opt/cc"}
    assert pico.compile_unavailable(gpu) is None
    monkeypatch.setenv("CC", "gcc -O2")                    # one name to Triton, not gcc's flags
    found = {"gcc"}
    assert "CC='gcc -O2' names no program" in pico.compile_unavailable(gpu)
    monkeypatch.setattr(pico.importlib.util, "find_spec",
                        lambda name, *args: None if name == "triton" else real_find_spec(name, *args))
    assert "needs the triton package" in pico.compile_unavailable(gpu)


def test_rope_ab_tool_times_both_formulations(capsys):
    from conftest import TOOLS
    from pico_module import load_script
    ab_rope = load_script(TOOLS / "ab_rope.py", "pico_ab_rope")
    assert ab_rope.main(["--shape", "2", "2", "8", "8", "--samples", "2", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "largest difference 0.0e+00" in out and "real / complex:" in out
    assert ab_rope.main(["--step", "--vocab", "40", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "a vocabulary of 40" in out and out.count("ms a step") == 2 and "real / complex:" in out


def test_cpu_matmul_ab_tool_times_both_kernels_on_every_config(capsys, monkeypatch):
    from conftest import TOOLS
    from pico_module import load_script
    ab = load_script(TOOLS / "ab_cpu_matmul.py", "pico_ab_cpu_matmul")
    assert ab.main(["--quick", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "product: oneDNN" in out and out.count("ms a step") == 7
    assert "mainjob_transformer: oneDNN" in out and "transformer_vocab4096: oneDNN" in out
    monkeypatch.setattr(ab.pico, "onednn_available", lambda: False)   # a build without it
    with pytest.raises(SystemExit) as refused:
        ab.main(["--quick"])
    assert refused.value.code == 2 and "has no oneDNN linear op" in capsys.readouterr().err


@pytest.mark.parametrize("capability, expected", [((7, 5), "float32"), ((8, 0), "bfloat16"),
                                                  ((9, 0), "bfloat16")])
def test_the_default_precision_is_bf16_only_on_gpus_with_bf16_units(pico, monkeypatch,
                                                                     capability, expected):
    """A T4 (7.5) or V100 (7.0) emulates bf16, more slowly than it runs float32: training and
    the decoder stay in float32 there unless --dtype asks; Ampere (8.0) and later take bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda", 1)
    assert pico.resolve_dtype(None, gpu) == expected
    assert pico.resolve_dtype("float32", gpu) == "float32"
    assert pico.resolve_dtype("bfloat16", gpu) == "bfloat16"
    assert pico.resolve_dtype(None, torch.device("cpu")) == "float32"
    autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda **kwargs: kwargs)    # no CUDA build needed
    trained_in = pico.autocast_context(gpu)                             # training's default
    monkeypatch.setattr(torch, "autocast", autocast)
    assert (trained_in == dict(device_type="cuda", dtype=torch.bfloat16)) is (expected == "bfloat16")
    built = []
    monkeypatch.setattr(pico.StaticDecoder, "__init__",
                        lambda self, model, **kwargs: built.append(kwargs["dtype"]))
    model = pico.build_model(pico.TransformerConfig(d_model=16, n_heads=2, n_blocks=1,
                                                    block_size=8), 11, 0)
    pico.decoding_model(model, gpu)
    assert built == [getattr(torch, expected)]


@pytest.mark.parametrize("capability, name, noted", [((7, 5), "Tesla T4", True),
                                                     ((7, 0), "Tesla V100-SXM2-16GB", True),
                                                     ((8, 0), "NVIDIA A100-SXM4-40GB", False)])
def test_bfloat16_asked_of_a_gpu_without_bf16_units_is_noted(pico, monkeypatch, capability, name,
                                                            noted):
    """The default trains such a GPU in float32; --dtype bfloat16 there gets one note, since
    PyTorch emulates bf16 more slowly than float32. float32, and the CPU, get none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    for dtype, device, expected in [("bfloat16", "cuda:0", noted), ("float32", "cuda:0", False),
                                    (None, "cuda:0", False), ("bfloat16", "cpu", False)]:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            pico.note_emulated_bf16(dtype, torch.device(device))
        assert err.getvalue().count("\n") == expected, (dtype, device)
        if expected:
            assert err.getvalue() == (
                f"pico-llm: note: --dtype bfloat16 on {name} (compute capability "
                f"{capability[0]}.{capability[1]}), which has no bf16 units: PyTorch emulates "
                "bf16 there, more slowly than it computes float32; drop --dtype to train in "
                "float32\n")


def test_a_run_and_a_sweep_note_bfloat16_asked_of_a_gpu_without_bf16_units(pico, run_main,
                                                                           monkeypatch, tmp_path):
    """Said before anything is read: here a run stopped at once by an --artefacts_dir that is
    a file."""
    from conftest import TINY_RUN
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    (tmp_path / "a_file").write_text("")
    for command in ([*TINY_RUN], ["--sweep", "budget", "--sweep_scale", "tiny"]):
        status, _, err = run_main(*command, "--device_id", "cuda:0", "--dtype", "bfloat16",
                                  artefacts=tmp_path / "a_file")
        assert status == 2 and "--dtype bfloat16 on Tesla T4" in err.splitlines()[0], err


def test_apple_gpu_refuses_what_pytorch_computes_wrongly_there(pico, run_main, monkeypatch):
    """On Apple's GPU (MPS), PyTorch 2.13's causal attention in bf16 lets positions see later
    tokens, and its compiler is a prototype: both refused in one line before any training.
    float32, the default there, trains as it would."""
    from conftest import TINY_RUN
    mps = torch.device("mps")
    assert pico.resolve_dtype(None, mps) == "float32"
    pico.check_dtype_fits(None, mps)
    pico.check_dtype_fits("float32", mps)
    pico.check_dtype_fits("bfloat16", torch.device("cpu"))
    assert "prototype" in pico.compile_unavailable(mps)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for command in ([*TINY_RUN], ["--sweep", "budget", "--sweep_scale", "tiny"]):
        status, out, err = run_main(*command, "--device_id", "mps", "--dtype", "bfloat16")
        assert status == 2 and err.count("\n") == 1, err
        assert "--dtype bfloat16 on Apple's GPU (MPS)" in err and "use --dtype float32" in err


def test_apple_gpu_training_notes_what_pytorch_before_2_14_computes_wrongly_there(
        pico, run_main, monkeypatch, tmp_path):
    """Training on Apple's GPU with PyTorch before 2.14 notes its reported float32 matmul
    defect there (pytorch#193487) once, for a run or a sweep; later releases and other
    devices say nothing."""
    from conftest import TINY_RUN
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for version, noted in [("2.13.0", True), ("2.9.1+cpu", True), ("2.14.0", False),
                           ("2.15.0.dev20261201", False)]:
        monkeypatch.setattr(torch, "__version__", version)
        for device in ("mps", "cpu"):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                pico.note_apple_gpu_defects(torch.device(device))
            expected = noted and device == "mps"
            assert err.getvalue().count("\n") == expected
            assert ("pytorch#193487" in err.getvalue()) == expected
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    # Where the note is printed: a run stopped at once by an --artefacts_dir that is a file
    (tmp_path / "a_file").write_text("")
    for command in ([*TINY_RUN], ["--sweep", "budget", "--sweep_scale", "tiny"]):
        status, _, err = run_main(*command, "--device_id", "auto", artefacts=tmp_path / "a_file")
        assert status == 2 and "pytorch#193487" in err.splitlines()[0], err


def test_apple_gpu_trains_with_the_fused_adamw(pico):
    """PyTorch has a fused AdamW for MPS and no foreach kernels there (foreach is a loop over
    the tensors on MPS); the CPU and CUDA take the fused one too."""
    model = torch.nn.Linear(4, 4)
    for device in ("mps", "cpu", "cuda"):
        optimizer = pico.build_optimizer(model, pico.TrainingConfig(), torch.device(device))
        assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]


def test_apple_gpu_draws_tokens_on_the_cpu(pico):
    """MPS's multinomial in PyTorch 2.13 now and then picks a token of probability 0, so a
    Mac samples on the CPU; every other device samples where its model runs."""
    assert pico.sampling_device("mps") == torch.device("cpu")
    assert pico.sampling_device(torch.device("mps", 0)) == torch.device("cpu")
    assert pico.sampling_device("cpu") == torch.device("cpu")
    assert pico.sampling_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


@pytest.mark.parametrize("T, S, window", [(1, 9, None), (5, 9, None), (7, 7, 3), (1, 9, 4)])
def test_folded_query_groups_equal_grouped_query_attention(pico, T, S, window):
    """Appendix A.2's fold (each key/value head's query heads laid along the query axis, so a
    masked step can take a fused kernel) against PyTorch's grouped-query attention: values and
    gradients, for a static cache's step, a prompt, and sliding windows."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 6, 8, generator=generator)[:, :T].transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 3, S, 8, generator=generator).requires_grad_() for _ in range(2))
    # q: (B, H = 6, T, D), not contiguous, as attention passes it; k, v: (B, H_kv = 3, S, D)
    mask = pico.causal_mask(T, S, torch.device("cpu"), window)
    results = []
    for attention in (lambda: torch.nn.functional.scaled_dot_product_attention(
                          q, k, v, attn_mask=mask, enable_gqa=True),
                      lambda: pico.attention_with_folded_groups(q, k, v, mask)):
        y = attention()
        results.append((y, *torch.autograd.grad((y * torch.arange(8.0)).sum(), (q, k, v))))
    for grouped, folded in zip(*results):
        assert grouped.shape == folded.shape
        assert torch.allclose(grouped, folded, atol=1e-6)


def test_masked_grouped_query_steps_take_the_fold(pico, monkeypatch):
    """Decoding a grouped-query model through the static decoder (a mask every step) and
    training it with a sliding window: no fused-kernel call with both a mask and grouped
    queries, which only the math kernel would take; the decoder's tokens are unchanged."""
    import torch.nn.functional as F
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, enable_gqa=False):
        calls.append((attn_mask is not None, q.shape[1] != k.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    enable_gqa=enable_gqa)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    model = tiny_model(pico, "transformer", "--transformer_variant", "Llama3-lite", "--n_kv_heads",
                       "2", "--sliding_window", "4").eval()
    greedy = pico.SamplingRule(temperature=0)
    uncached = pico.generate_ids(model, [3, 1, 4, 1, 5], 12, greedy, use_cache=False)
    assert pico.generate_ids(pico.StaticDecoder(model), [3, 1, 4, 1, 5], 12, greedy) == uncached
    model.train()
    tokens = torch.randint(0, VOCAB, (16, 2))
    pico.NextTokenLoss(model)(tokens, tokens, torch.ones(16, 2)).backward()
    assert (True, False) in calls and (True, True) not in calls


def test_float32_lstm_is_the_lstm_with_the_same_parameters(pico):
    """What speed_up swaps in (autocast would run cuDNN's LSTM in float16, and oneDNN's bf16
    LSTM fails on a CPU without AVX-512): the same module, state_dict and outputs, computed in
    float32 from inputs of any float dtype, under autocast too."""
    torch.manual_seed(0)
    model = pico.LSTMSeqModel(40, embed_size=16, hidden_size=24, num_layers=2)
    tokens = torch.randint(0, 40, (7, 3))
    expected = model(tokens)
    expected_cached, expected_state = model.forward_incremental(tokens, None)
    keys = model.state_dict().keys()
    pico.float32_lstm(model)
    assert type(model.lstm) is pico.Float32LSTM and model.state_dict().keys() == keys
    assert torch.equal(model(tokens), expected)
    cached, state = model.forward_incremental(tokens, None)
    assert torch.equal(cached, expected_cached)
    assert all(torch.equal(a, b) for a, b in zip(state, expected_state))
    out, (h, c) = model.lstm(torch.randn(5, 3, 16).bfloat16(), tuple(x.bfloat16() for x in state))
    assert out.dtype == h.dtype == c.dtype == torch.float32
    inputs = torch.randn(5, 3, 16)                   # a given state is carried on, not dropped
    assert torch.equal(model.lstm(inputs, state)[0], torch.nn.LSTM.forward(model.lstm, inputs, state)[0])
    assert not torch.equal(model.lstm(inputs, state)[0], model.lstm(inputs)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = model.lstm(torch.randn(5, 3, 16), state)
        assert out.dtype == h.dtype == c.dtype == torch.float32
    fresh = pico.LSTMSeqModel(40, embed_size=16, hidden_size=24, num_layers=2)
    pico.speed_up(fresh, pico.SpeedConfig(), torch.device("cpu"))
    assert type(fresh.lstm) is pico.Float32LSTM
