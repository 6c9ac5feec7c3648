"""What only a GPU can check: bf16 training, compiled training, CUDA-graph decoding and the fused
attention kernel on CUDA, and torchrun's NCCL backend. Marked `cuda`; skipped without CUDA
(`python -m pytest -m cuda` on a GPU machine; tools/gpu_checks.sh runs them)."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, SCRIPT, TINY_RUN, world_of_one_probe

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")
VOCAB = 97
# GPT-2's shape scaled down, with its learned positions and tied output; and GPT-oss's blocks
# (grouped-query attention with sinks, a sliding window, a mixture of experts).
SMALL = dict(d_model=64, n_heads=4, n_blocks=2, block_size=32)
PRESETS = {"GPT2-small": dict(SMALL, d_ff=256, dropout=0.0),
           "GPT-oss": dict(SMALL, n_blocks=4, n_kv_heads=2, d_ff=64, sliding_window=8),
           "Llama3-lite": dict(SMALL, n_kv_heads=2, d_ff=128),   # grouped queries, no sinks
           "pico": SMALL}


def tiny(pico, preset: str, seed: int = 0):
    config = pico.TransformerConfig(**{**pico.TRANSFORMER_PRESETS[preset], **PRESETS[preset]})
    return pico.build_model(config, VOCAB, seed).to(DEVICE)


def random_batch(pico, seed: int, length: int = 32, batch: int = 4):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (length + 1, batch), generator=generator)
    return pico.Batch(tokens[:-1], tokens[1:], torch.ones(length, batch, dtype=torch.bool)).to(DEVICE)


def train_steps(pico, loss_model, model, steps: int, dtype: str) -> list[float]:
    optimizer = pico.build_optimizer(model, pico.TrainingConfig(), DEVICE)
    return [pico.training_step(loss_model, optimizer, [(random_batch(pico, step), True)], 128, 1.0,
                               dtype=dtype) for step in range(steps)]


@pytest.mark.parametrize("preset", ["GPT2-small", "GPT-oss"])
def test_bf16_training_steps_are_finite_and_close_to_fp32(pico, preset):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny(pico, preset)
        losses[dtype] = train_steps(pico, pico.ChunkedNextTokenLoss(model), model, 3, dtype)
    fp32, bf16 = losses["float32"], losses["bfloat16"]
    assert all(map(torch.isfinite, map(torch.tensor, bf16)))
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_the_lstm_trains_in_float32_under_bf16_autocast_close_to_fp32(pico):
    """speed_up's Float32LSTM keeps cuDNN's LSTM out of autocast, which would run it in float16:
    its outputs are float32, and bf16 steps land close to float32 ones."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = pico.build_model(pico.LSTMConfig(embed_size=64, num_layers=2), VOCAB, 0).to(DEVICE)
        loss_model = pico.speed_up(model, pico.SpeedConfig(), DEVICE)
        assert type(model.lstm) is pico.Float32LSTM
        with pico.autocast_context(DEVICE, "bfloat16"):
            assert model.features(random_batch(pico, 0).inputs).dtype == torch.float32
        losses[dtype] = train_steps(pico, loss_model, model, 3, dtype)
    assert all(map(torch.isfinite, map(torch.tensor, losses["bfloat16"])))
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


@pytest.mark.parametrize("preset", ["GPT2-small", "GPT-oss"])
def test_fused_loss_on_a_gpu_equals_the_written_out_loss(pico, preset):
    """The loss a GPU trains with (PyTorch's cross-entropy kernel) against section 3's formula,
    in float32 on the GPU: the same value and gradients."""
    model = tiny(pico, preset)
    batch = random_batch(pico, 0)
    results = []
    for loss_module in (pico.NextTokenLoss(model), pico.FusedNextTokenLoss(model)):
        model.zero_grad()
        loss = loss_module(batch.inputs, batch.targets, batch.mask.float() / 128)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("preset", ["GPT2-small", "GPT-oss"])
def test_compiled_training_equals_eager(pico, preset):
    """speed_up with compile on a GPU: model, output layer and loss in one compiled region;
    with experts (GPT-oss), each block compiled on its own."""
    from torch._dynamo.utils import counters
    eager_model, compiled_model = tiny(pico, preset), tiny(pico, preset)
    eager = train_steps(pico, pico.NextTokenLoss(eager_model), eager_model, 4, "bfloat16")
    torch._dynamo.reset()
    counters.clear()
    loss = pico.speed_up(compiled_model, pico.SpeedConfig(compile=True), DEVICE)
    if preset == "GPT-oss":
        assert type(loss) is pico.FusedNextTokenLoss            # the blocks are compiled instead
    else:
        assert isinstance(loss.compiled, torch._dynamo.eval_frame.OptimizedModule)
    compiled = train_steps(pico, loss, compiled_model, 4, "bfloat16")
    assert compiled == pytest.approx(eager, rel=2e-2)
    kinds = len({block.attention.window for block in compiled_model.blocks}) if preset == "GPT-oss" else 1
    assert counters["stats"]["unique_graphs"] == kinds          # no recompilation across steps


@pytest.mark.parametrize("preset, compile", [("GPT2-small", False), ("pico", False),
                                             ("GPT-oss", False), ("GPT-oss", True)])
def test_cuda_graph_decoding_equals_uncached_generation(pico, preset, compile):
    """The static decoder replaying a CUDA graph per token (prompt + 40 tokens runs past the
    32-token block, so the context slides and the cache is rebuilt) gives uncached greedy ids."""
    model = tiny(pico, preset).eval()
    greedy = pico.SamplingRule(temperature=0)
    prompt = [3, 1, 4, 1, 5]
    uncached = pico.generate_ids(model, prompt, 40, greedy, use_cache=False, device=DEVICE)
    decoder = pico.StaticDecoder(model, graphs=True, compile=compile)
    assert pico.generate_ids(decoder, prompt, 40, greedy, device=DEVICE) == uncached
    assert decoder.graph is not None


@pytest.mark.parametrize("preset, optimizer", [("GPT2-small", "torch"), ("pico", "torch"),
                                               ("pico", "muon")])
def test_a_training_step_waits_for_the_gpu_at_most_once(pico, preset, optimizer):
    """The step's loss and gradient norm come back in one copy; nothing else in it (the
    weighted loss, clipping, the fused AdamW, Muon's stacked iterations) makes the host wait
    for the device, so the GPU is never idle while Python prepares the next step."""
    model = tiny(pico, preset)
    loss_model = pico.speed_up(model, pico.SpeedConfig(), DEVICE)   # the loss a GPU trains with
    optimizer = pico.build_optimizer(model, pico.TrainingConfig(optimizer=optimizer), DEVICE)
    batches = [random_batch(pico, seed) for seed in range(2)]
    pico.training_step(loss_model, optimizer, [(batches[0], True)], 128, 1.0, dtype="bfloat16")
    torch.cuda.synchronize()           # the first step made the optimizer's state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pico.training_step(loss_model, optimizer, [(batches[1], True)], 128, 1.0,
                               dtype="bfloat16")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) <= 1, waits


def test_evaluation_waits_for_the_gpu_only_at_the_end(pico):
    """evaluate keeps each batch's loss, tokens and bytes on the GPU and reads them after the
    last batch (two copies), so the host queues every batch's work without waiting for the one before."""
    loss_model = pico.speed_up(tiny(pico, "pico"), pico.SpeedConfig(), DEVICE)
    token_bytes = torch.ones(VOCAB, dtype=torch.long, device=DEVICE)
    batches = [random_batch(pico, seed) for seed in range(6)]
    expected = pico.evaluate(loss_model, batches, DEVICE, token_bytes, dtype="bfloat16")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = pico.evaluate(loss_model, batches, DEVICE, token_bytes, dtype="bfloat16")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) <= 2, waits                    # the losses, then the counts
    assert result == expected and result["test_tokens"] == 6 * 32 * 4


def test_cuda_graph_decoding_waits_for_the_gpu_once_per_token(pico):
    """The host reads each sampled id (to keep it and to stop at end-of-text), and that is the
    one wait: the id goes back into the graph's input on the GPU, not through a copy from a
    Python list. The prompt adds two (its copy to the GPU and the check of its logits)."""
    decoder = pico.StaticDecoder(tiny(pico, "GPT2-small").eval(), graphs=True)
    greedy, prompt, new_tokens = pico.SamplingRule(temperature=0), [3, 1, 4], 20
    expected = pico.generate_ids(decoder, prompt, new_tokens, greedy, device=DEVICE)  # records it
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ids = pico.generate_ids(decoder, prompt, new_tokens, greedy, device=DEVICE)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert ids == expected
    assert len(waits) <= new_tokens + 2, waits


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_cuda_graph_decoding_on_a_gpu_that_is_not_the_current_one(pico):
    """--device_id cuda:1 leaves cuda:0 current: the graph must still be recorded and replayed
    on the model's GPU (recorded on the current one's streams it came out empty, and every
    replay returned the first token's logits again)."""
    model = tiny(pico, "GPT2-small").to("cuda:1").eval()
    greedy, prompt = pico.SamplingRule(temperature=0), [3, 1, 4, 1, 5]
    assert torch.cuda.current_device() == 0
    uncached = pico.generate_ids(model, prompt, 20, greedy, use_cache=False, device="cuda:1")
    decoder = pico.StaticDecoder(model, graphs=True)
    assert pico.generate_ids(decoder, prompt, 20, greedy, device="cuda:1") == uncached


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8,
                    reason="decodes in float32 on a GPU without bf16 units (before Ampere)")
def test_generation_on_a_gpu_goes_through_the_bf16_cuda_graph_decoder(pico):
    model = tiny(pico, "GPT2-small")
    decoder = pico.decoding_model(model, DEVICE)
    assert isinstance(decoder, pico.StaticDecoder) and decoder.graphs
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    ids = pico.generate_ids(decoder, [3, 1, 4], 20, pico.SamplingRule(temperature=0), device=DEVICE)
    assert len(ids) == 23 and all(0 <= i < VOCAB for i in ids)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("preset", ["GPT2-small", "Llama3-lite"])
def test_attention_runs_on_the_fused_kernels(pico, preset, dtype):
    """Training (causal) and static decoding (a mask over the cache) with only flash and
    memory-efficient attention allowed: a fallback to the math kernel would raise. Llama3-lite's
    grouped queries too: under the static cache's mask, and in float32 (which flash attention
    does not take), they are folded along the query axis (attention_with_folded_groups), as the
    one fused kernel that takes a mask needs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny(pico, preset)
    batch = random_batch(pico, 0)
    decoder = pico.StaticDecoder(model, dtype=getattr(torch, dtype), graphs=False)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with pico.autocast_context(DEVICE, dtype):
            loss = pico.NextTokenLoss(model)(batch.inputs, batch.targets, batch.mask.float() / 128)
        loss.backward()
        ids = pico.generate_ids(decoder, [3, 1, 4], 5, pico.SamplingRule(temperature=0), device=DEVICE)
    assert torch.isfinite(loss) and len(ids) == 8


def test_torchrun_on_a_gpu_joins_with_nccl_and_trains(pico, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    probe = tmp_path / "probe.py"
    # One process is not distributed for pico-llm; a world of "2" makes it join the job, and
    # NCCL's collectives and DDP's step then run for real in a world of one
    probe.write_text(world_of_one_probe("cuda:0"))
    joined = subprocess.run([*torchrun, str(probe)], capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0, joined.stderr
    assert joined.stdout.splitlines()[:1] == ["nccl gloo cuda:0"]   # stop decisions on the CPU
    assert "DistributedDataParallel" in joined.stdout
    trained = subprocess.run([*torchrun, str(SCRIPT), *TINY_RUN, "--models", "transformer",
                              "--device_id", "cuda:0", "--artefacts_dir", str(tmp_path / "art"),
                              "--cache_dir", str(tmp_path / "cache"), "--run_name", "gpu"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    log = json.loads((tmp_path / "art" / "gpu.json").read_text())
    assert log["environment"]["device"] == "cuda:0"
    history = log["models"]["transformer"]["history"]
    assert history and all(map(torch.isfinite, map(torch.tensor, [h["train_loss"] for h in history])))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_torchrun_on_two_gpus_trains_with_nccl(tmp_path):
    """Two ranks on two GPUs: DDP, the step's on-device loss all-reduce, the stop decisions
    through the CPU group and the final barrier, all under NCCL."""
    trained = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", str(SCRIPT), *TINY_RUN, "--models",
                              "transformer", "--artefacts_dir", str(tmp_path / "art"),
                              "--cache_dir", str(tmp_path / "cache"), "--run_name", "two"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    log = json.loads((tmp_path / "art" / "two.json").read_text())
    assert log["environment"]["device"] == "cuda:0" and log["status"] == "finished"
    history = log["models"]["transformer"]["history"]
    assert history and all(map(torch.isfinite, map(torch.tensor, [h["train_loss"] for h in history])))


def test_muon_on_a_gpu_orthogonalizes_in_bfloat16_close_to_the_cpu(pico, monkeypatch):
    """A GPU's Muon (Appendix A.3's ForeachMuon) runs the Newton-Schulz iteration in bfloat16,
    the matrices of one shape stacked (float32 on the CPU, one at a time): one step from the
    same weights and gradients lands within a few percent of the CPU's update, each matrix."""
    stacks = []
    orthogonalize = pico.newton_schulz_orthogonalize

    def recorded(matrix, *args):
        stacks.append((matrix.device.type, tuple(matrix.shape)))
        assert len(args) <= 1                                 # the dtype left to the device
        return orthogonalize(matrix, *args)

    monkeypatch.setattr(pico, "newton_schulz_orthogonalize", recorded)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=generator) for shape in [(64, 256), (64, 256), (96, 32)]]
    gradients = [torch.randn(w.shape, generator=generator) * scale for w, scale in zip(weights, (1, 10, 1))]
    updates = []
    for device in ("cpu", DEVICE):
        parameters = [torch.nn.Parameter(w.clone().to(device)) for w in weights]
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient.clone().to(device)
        pico.ForeachMuon([dict(params=parameters, muon=True, weight_decay=0.0)], lr=0.01).step()
        updates.append([parameter.detach().cpu() - w for parameter, w in zip(parameters, weights)])
    for cpu, gpu in zip(*updates):
        assert gpu.norm() > 0 and (gpu - cpu).norm() / cpu.norm() < 0.08   # 3-4% in the CPU's bf16
    assert sorted(shape for device, shape in stacks if device == "cuda") == [(2, 64, 256), (96, 32)]
    assert sorted(shape for device, shape in stacks if device == "cpu") == [(64, 256)] * 2 + [(96, 32)]
    x = torch.randn(64, 256, generator=generator).to(DEVICE)     # bfloat16 unless told otherwise
    same = torch.equal(orthogonalize(x), orthogonalize(x, 5, torch.float32))
    assert same != pico.has_bf16_units(DEVICE)        # a T4 or V100 emulates bf16: float32 there


def test_foreach_muon_on_a_gpu_takes_muons_steps(pico, monkeypatch):
    """Appendix A's ForeachMuon, which --optimizer muon takes on a GPU, against section 5's Muon
    on the GPU: 5 steps from the same weights and gradients land on the same weights (to the
    rounding of the fused multi-tensor kernels), over a tiny GPT-2's hidden matrices (bfloat16
    Newton-Schulz) and the tensors AdamW takes. Each matrix is orthogonalized on its own, as
    section 5's Muon does: a stack's batched product rounds as its own kernel does (the test
    above compares the stacked one with the CPU's)."""
    monkeypatch.setattr(pico.ForeachMuon, "stack_key", staticmethod(id))
    models = [tiny(pico, "GPT2-small", seed=0) for _ in range(2)]
    training = pico.TrainingConfig(optimizer="muon")
    optimizers = [pico.build_optimizer(model, training, DEVICE) for model in models]
    assert all(type(optimizer) is pico.ForeachMuon for optimizer in optimizers)
    optimizers[0].__class__ = pico.Muon                       # the same groups, section 5's loops
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        gradients = [torch.randn(p.shape, generator=generator).to(DEVICE) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), gradients):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
