"""Shared fixtures. pico-llm.py has a hyphen in its name, so it is loaded with importlib, once."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "pico-llm.py"
BENCHMARK = REPO / "tools" / "benchmark.py"


def load_pico():
    if "pico_llm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pico_llm", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["pico_llm"] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["pico_llm"]


@pytest.fixture(scope="session")
def pico():
    return load_pico()


@pytest.fixture(scope="session")
def bench(pico):
    """tools/benchmark.py as a module (it loads pico-llm.py the same way)."""
    if "pico_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pico_benchmark", BENCHMARK)
        module = importlib.util.module_from_spec(spec)
        sys.modules["pico_benchmark"] = module
        spec.loader.exec_module(module)
    return sys.modules["pico_benchmark"]


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
    config.addinivalue_line("markers", "slow: end-to-end runs (tens of seconds); "
                                       "skip locally with -m 'not slow'")
