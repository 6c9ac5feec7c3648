"""Shared fixtures. pico-llm.py has a hyphen in its name, so it is loaded with importlib, once,
by the loader the tools use (tools/pico_module.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
SCRIPT = REPO / "pico-llm.py"
BENCHMARK = TOOLS / "benchmark.py"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from pico_module import load_pico, load_script  # noqa: E402  (tools/ is on the path now)

# A training run of seconds on the shipped corpus, for tests of the command line's paths.
TINY_RUN = ["--input_files", str(REPO / "3seqs.txt"), "--limit_custom_examples", "60",
            "--block_size", "16", "--embed_size", "16", "--d_model", "32", "--n_heads", "2",
            "--n_blocks", "1", "--max_steps_per_epoch", "3", "--epochs", "2", "--batch_size", "4",
            "--max_new_tokens", "4", "--tokenizer", "char", "--quiet"]


def probe_loading(variable: str, path: Path, name: str) -> str:
    """The first lines of a `python -c` probe: `variable = ` the script at `path`, loaded as
    the module `name` by the same loader."""
    return (f"import sys\nsys.path.insert(0, {str(TOOLS)!r})\nfrom pico_module import load_script\n"
            f"{variable} = load_script({str(path)!r}, {name!r})\n")


def world_of_one_probe(device_id: str) -> str:
    """A torchrun probe that joins its job as one of a pretended world of 2 (torchrun's own
    world is 1, so no rank is waited for), then does a step's collectives for real: the loss's
    all-reduce, the evaluation's sums, and a DDP step of two micro-batches (the first under
    no_sync, so that its gradients are all-reduced once, as in a step of one). Prints the
    backends and device, then the wrapper's class and the step's loss."""
    return probe_loading("pico", SCRIPT, "pico_llm") + f"""
import math
import os
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
pico.launched_world_size = lambda: 2
context, device_id = pico.setup_distributed({device_id!r}, 60)
device = torch.device(device_id)
print(dist.get_backend(), dist.get_backend(context.control_group), device_id)
summed = context.sum_in_place(torch.ones(2, device=device))      # a world of one: unchanged
assert summed.device == device and summed.tolist() == [1.0, 1.0], summed
assert context.sum([1.0, 2.5], device) == [1.0, 2.5]
config = pico.TransformerConfig(d_model=32, n_heads=2, n_blocks=1, block_size=16)
model = pico.build_model(config, vocab_size=50, seed=0).to(device)
loss = pico.wrap_for_training(pico.FusedNextTokenLoss(model), context, device)
all_reduces = []                                        # one per gradient bucket synced
def counted_all_reduce(state, bucket):
    all_reduces.append(bucket.index())
    return default_hooks.allreduce_hook(state, bucket)
loss.register_comm_hook(None, counted_all_reduce)
batch = pico.make_batch([list(range(i, i + 17)) for i in range(4)], 16, 0).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
pico.training_step(loss, optimizer, [(batch, True)], batch.num_target_tokens, 1.0, context)
one_micro_batch, all_reduces[:] = len(all_reduces), []
before = [parameter.detach().clone() for parameter in model.parameters()]
step_loss = pico.training_step(loss, optimizer, [(batch, True), (batch, True)],
                               2 * batch.num_target_tokens, 1.0, context)
assert len(all_reduces) == one_micro_batch > 0, (all_reduces, one_micro_batch)
assert abs(step_loss - math.log(50)) < 1.0, step_loss             # the token mean, near ln V
assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
print(type(loss).__name__, f"{{step_loss:.1f}}", flush=True)
os._exit(0)   # no teardown right after DDP's last all-reduce: gloo's can deadlock there
"""


def plain_and_chunked_losses(pico, model, inputs, targets, weights) -> list:
    """[(loss, [each parameter's gradient])] from one backward pass through Part I's
    NextTokenLoss and one through Appendix A's ChunkedNextTokenLoss, in that order."""
    results = []
    for loss_module in (pico.NextTokenLoss(model), pico.ChunkedNextTokenLoss(model)):
        model.zero_grad()
        loss = loss_module(inputs, targets, weights)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


@pytest.fixture(scope="session")
def pico():
    return load_pico()


@pytest.fixture(scope="session")
def bench(pico):
    """tools/benchmark.py as a module (it loads pico-llm.py the same way)."""
    return load_script(BENCHMARK, "pico_benchmark")


@pytest.fixture(scope="module")
def one_thread():
    """For a module of tiny tensors: one thread. Two OpenMP threads on a busy 2-core machine
    spin against each other (measured at load 7: 40 greedy tokens from the tiny pico
    Transformer without a cache, 11.4 s with 2 threads, 0.26 s with 1)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def configure(pico):
    """The Config a command line gives, built as main() builds it: configure("--epochs", "2")."""
    return lambda *argv: pico.config_from_command_line(list(argv))


@pytest.fixture(scope="session")
def gpt2(pico):
    return pico.GPT2Tokenizer()


@pytest.fixture
def run_main(pico, tmp_path, capsys):
    """Call main() in-process with a private artefacts and cache dir; returns (status, out, err)."""

    def run(*argv, artefacts=None):
        artefacts = artefacts or tmp_path / "artefacts"
        full = [*argv, "--artefacts_dir", str(artefacts), "--cache_dir", str(tmp_path / "cache")]
        if "--device_id" not in argv:
            full += ["--device_id", "cpu"]
        status = pico.main(full)
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def run_script(*argv, cwd=REPO, timeout=300):
    """Run pico-llm.py in a subprocess, as a user would."""
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def pytest_configure(config):
    # Under pytest-xdist (-n N) the workers share the cores: each takes its share of threads,
    # and so do the scripts it starts (they read OMP_NUM_THREADS), for OpenMP threads beyond
    # the cores spin against each other (the one_thread fixture above: 11.4 s against 0.26 s).
    # Set before any test module imports torch, which reads it then; one set by hand is kept.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and workers.isdigit():
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
    config.addinivalue_line("markers", "slow: end-to-end runs (tens of seconds); "
                                       "skip locally with -m 'not slow'")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); "
                                       "run on a GPU machine with -m cuda")


def pytest_collection_modifyitems(config, items):
    # The end-to-end runs marked slow go first (in their own order, the rest after them in
    # theirs): pytest-xdist hands tests out in collection order, and a run of a minute that
    # began last would leave the other workers idle at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
