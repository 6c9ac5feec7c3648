"""Section 11: data-parallel training with torchrun (gloo on CPU)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SCRIPT, probe_loading, world_of_one_probe

TINY = ["--input_files", str(REPO / "3seqs.txt"), "--limit_custom_examples", "120",
        "--tokenizer", "char", "--models", "lstm_seq,transformer", "--block_size", "24",
        "--d_model", "32", "--n_heads", "2", "--n_blocks", "1", "--embed_size", "32",
        "--batch_size", "6", "--max_steps_per_epoch", "4", "--epochs", "2", "--device_id", "cpu",
        "--quiet", "--run_name", "run"]


def losses(pico, path):
    log = pico.load_runlog(path)
    return {name: [h["train_loss"] for h in record["history"]] + [record["final"]["test_loss"]]
            for name, record in log["models"].items()}


def test_rank_shares_are_disjoint_and_cover_the_step(pico):
    slots = [(0, i) for i in range(7)]
    shares = [pico.Distributed(rank, 3).shard(slots) for rank in range(3)]
    assert sorted(sum(shares, [])) == slots
    assert not set(shares[0]) & set(shares[1])


def test_a_world_of_one_runs_the_steps_collectives_and_a_ddp_step_on_gloo(tmp_path):
    """The probe that tests/test_cuda.py runs with NCCL on a GPU (where one GPU gives no second
    rank), here on the CPU with gloo: its collectives and its two micro-batch DDP step."""
    probe = tmp_path / "probe.py"
    probe.write_text(world_of_one_probe("cpu"))
    joined = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "1", str(probe)], capture_output=True, text=True,
                            timeout=300)
    assert joined.returncode == 0, joined.stderr[-3000:]
    lines = joined.stdout.splitlines()
    assert lines[0] == "gloo gloo cpu"
    assert lines[1].startswith("DistributedDataParallel ") and 3.0 < float(lines[1].split()[1]) < 4.9


def test_the_compiled_loss_under_torchrun_is_split_at_ddps_gradient_buckets(tmp_path):
    """On a GPU under torchrun, DDP wraps the compiled loss (CompiledTrainingLoss). Its region
    compiles inside DDP's forward, where Dynamo's DDPOptimizer splits it at DDP's gradient
    buckets, so each bucket's all-reduce can start as its part of the backward ends (docs had
    said it could not overlap). A 49 MB model in DDP's 25 MB buckets: 3 graphs, 1 unwrapped. A
    counting backend stands in for Inductor: the split is Dynamo's, made before any code is."""
    probe = tmp_path / "probe.py"
    probe.write_text(probe_loading("pico", SCRIPT, "pico_llm") + """
import os
import torch
pico.launched_world_size = lambda: 2          # as world_of_one_probe: DDP over a world of one
context, device_id = pico.setup_distributed("cpu", 60)
graphs = []
def counting(graph, example_inputs):
    graphs.append(graph)
    return graph.forward
compile = torch.compile
torch.compile = lambda module, **options: compile(module, backend=counting, **options)
config = pico.TransformerConfig(d_model=512, n_heads=8, n_blocks=4, block_size=16)
model = pico.build_model(config, vocab_size=50, seed=0)
batch = pico.make_batch([list(range(i, i + 17)) for i in range(4)], 16, 0)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
for wrapped in (True, False):
    graphs.clear()
    torch.compiler.reset()
    loss = pico.CompiledTrainingLoss(pico.FusedNextTokenLoss(model))
    if wrapped:
        loss = pico.wrap_for_training(loss, context, torch.device("cpu"))
    pico.training_step(loss, optimizer, [(batch, True)], batch.num_target_tokens, 1.0,
                       context if wrapped else None)
    print(type(loss).__name__, len(graphs), flush=True)
os._exit(0)   # no teardown right after DDP's last all-reduce: gloo's can deadlock there
""")
    joined = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "1", str(probe)], capture_output=True, text=True,
                            timeout=300)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert joined.stdout.splitlines() == ["DistributedDataParallel 3", "CompiledTrainingLoss 1"]


def test_every_model_waits_for_rank_0s_final_checkpoint_before_the_next_begins(
        run_main, tmp_path, pico, monkeypatch):
    """With several models, a rank that went on into the next model while rank 0 still wrote
    its final checkpoint would wait in the next model's first all-reduce, bounded by
    --dist_timeout however long the writing takes. On one process the barrier returns at once,
    but it is still called: each model's final checkpoint is followed by one."""
    events = []
    save, barrier = pico.FaultTolerance.save_checkpoint, pico.Distributed.barrier
    def recorded_save(guard):
        events.append(("save", guard.name, guard.progress.finished))
        return save(guard)
    def recorded_barrier(context):
        events.append(("barrier",))
        return barrier(context)
    monkeypatch.setattr(pico.FaultTolerance, "save_checkpoint", recorded_save)
    monkeypatch.setattr(pico.Distributed, "barrier", recorded_barrier)
    status, _, err = run_main(*TINY, "--save_dir", str(tmp_path / "ckpt"))
    assert status == 0, err
    finals = [i for i, event in enumerate(events) if event[0] == "save" and event[2]]
    assert [events[i][1] for i in finals] == ["lstm_seq", "transformer"]
    assert all(events[i + 1] == ("barrier",) for i in finals), events


def test_gradient_accumulation_gives_the_same_updates(run_main, tmp_path, pico):
    for steps in ("1", "3"):
        status, _, err = run_main(*TINY, "--grad_accum_steps", steps, "--run_name", f"accum{steps}")
        assert status == 0, err
    one, three = (losses(pico, tmp_path / "artefacts" / f"accum{s}.json") for s in ("1", "3"))
    for name in one:
        assert three[name] == pytest.approx(one[name], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["torch", "muon"])
def test_two_gloo_ranks_match_one_process_and_write_once(pico, tmp_path, optimizer):
    """torchrun with 2 CPU ranks and the same global batch reproduces the 1-process losses.
    Muon orthogonalizes the all-reduced gradient, the same on every rank."""
    single = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--optimizer", optimizer, "--artefacts_dir",
                             str(tmp_path / "one"), "--cache_dir", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(SCRIPT), *TINY, "--optimizer", optimizer,
                             "--artefacts_dir", str(tmp_path / "two"), "--cache_dir", str(tmp_path / "cache"),
                             "--save_dir", str(tmp_path / "ckpt"), "--keep_checkpoints", "10"],
                            capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("run log written to") == 1
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["run.json"]
    for model in ("lstm_seq", "transformer"):      # rank 0 alone writes checkpoints
        assert [p.name for p in (tmp_path / "ckpt" / model).iterdir()] == ["step_000008.pt"]
    log = pico.load_runlog(tmp_path / "two" / "run.json")
    assert log["distributed"]["world_size"] == 2
    one, two = losses(pico, tmp_path / "one" / "run.json"), losses(pico, tmp_path / "two" / "run.json")
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-4)


@pytest.mark.slow
def test_an_error_on_the_ranks_ends_the_job_with_its_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(SCRIPT), *TINY, "--input_files",
                             str(tmp_path / "missing.txt"), "--artefacts_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pico-llm: error (rank 0): input file not found" in result.stderr


@pytest.mark.slow
def test_ranks_refuse_to_replace_an_earlier_runs_log(tmp_path):
    """Rank 0 alone writes, so rank 0 alone checks; torchrun then stops the other rank."""
    earlier = tmp_path / "run.json"
    earlier.write_text('{"an": "earlier run"}')
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(SCRIPT), *TINY, "--artefacts_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"pico-llm: error (rank 0): run log {earlier} already exists" in result.stderr
    assert earlier.read_text() == '{"an": "earlier run"}'


@pytest.mark.slow
def test_a_checkpoint_resumes_on_a_different_number_of_ranks(pico, tmp_path):
    """One process trains and checkpoints every 3 steps; two gloo ranks resume from the
    step-3 checkpoint and reproduce the one-process losses of steps 4 to 8."""
    tiny = [a if a != "lstm_seq,transformer" else "lstm_seq" for a in TINY]
    common = [*tiny, "--cache_dir", str(tmp_path / "cache"), "--save_dir", str(tmp_path / "ckpt"),
              "--checkpoint_every", "3", "--keep_checkpoints", "10"]
    single = subprocess.run([sys.executable, str(SCRIPT), *common, "--artefacts_dir",
                             str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    checkpoint = tmp_path / "ckpt" / "lstm_seq" / "step_000003.pt"
    assert checkpoint.exists()
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", str(SCRIPT), *common, "--resume", str(checkpoint),
                              "--save_dir", str(tmp_path / "ckpt2"), "--artefacts_dir",
                              str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one, two = losses(pico, tmp_path / "one" / "run.json"), losses(pico, tmp_path / "two" / "run.json")
    assert len(two["lstm_seq"]) == len(one["lstm_seq"])        # the whole history, from step 1
    assert two["lstm_seq"] == pytest.approx(one["lstm_seq"], rel=1e-4)


def test_a_rank_leaves_with_its_status_and_its_output_flushed():
    """Under torchrun a rank ends with os._exit (skipping C++ teardown that sometimes aborted)
    and must still deliver its buffered output and its exit status."""
    import os
    probe = (probe_loading("pico", SCRIPT, "pico_llm") +
             "print('buffered, no newline', end='')\n"
             "pico.exit_process(3)\n"
             "print('never reached')\n")
    for world_size in ("2", "1"):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "WORLD_SIZE": world_size})
        assert result.returncode == 3 and result.stdout == "buffered, no newline"


def ranks_by_hand(flags_of_rank, env_extra=None, folders=(None, None)):
    """Two processes started as torchrun starts its ranks (its variables set by hand), each
    with its own flags (and working folder); their (status, stdout, stderr)."""
    import os
    import socket
    with socket.socket() as probe:              # a free port for the ranks to meet at
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = []
    for rank, flags in enumerate(flags_of_rank):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen([sys.executable, str(SCRIPT), *flags, "--dist_timeout", "60"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=folders[rank]))
    outputs = [process.communicate(timeout=120) for process in ranks]
    return [(process.returncode, *output) for process, output in zip(ranks, outputs)]


def test_two_ranks_started_by_hand_with_other_flags_both_refuse(tmp_path):
    """The check below between two real processes, one's --batch_size changed: each says which
    flag differs and leaves with status 2, before either writes anything."""
    results = ranks_by_hand([[*TINY, "--batch_size", batch, "--artefacts_dir", str(tmp_path)]
                             for batch in ("6", "4")])
    for rank, (status, _, err) in enumerate(results):
        assert status == 2, err[-2000:]
        assert f"pico-llm: error (rank {rank}): rank {1 - rank} was started with other flags" in err
        assert "--batch_size" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_a_rank_whose_peer_refused_says_so_in_one_line(tmp_path):
    """The same command again, without --resume: rank 0 refuses the --save_dir holding the
    first run's checkpoints, and rank 1, waiting for it in a collective, had shown gloo's
    traceback ("Connection closed by peer")."""
    save_dir = tmp_path / "checkpoints"
    (save_dir / "lstm_seq").mkdir(parents=True)
    (save_dir / "lstm_seq" / "step_000004.pt").write_bytes(b"")     # a first run's
    flags = [*TINY, "--models", "lstm_seq", "--save_dir", str(save_dir),
             "--artefacts_dir", str(tmp_path / "art"), "--cache_dir", str(tmp_path / "cache")]
    (status, _, err), (other_status, _, other_err) = ranks_by_hand([flags, flags])
    assert status == 2 and "already holds checkpoints of lstm_seq" in err, err[-2000:]
    assert other_status == 2, other_err[-2000:]
    assert other_err.startswith("pico-llm: error (rank 1): another rank stopped ("), other_err[-2000:]
    assert other_err.endswith("; its error says why\n") and other_err.count("\n") == 1


def test_two_ranks_that_read_other_text_under_the_same_flags_both_refuse(tmp_path):
    """The same relative --input_files in two folders: gloo aborted rank 0 (a C++ dump) as
    their evaluations' collectives differed, or with fewer steps both trained, each on its own
    text, and said nothing."""
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, words in zip(folders, ("hello world", "other words entirely")):
        folder.mkdir()
        (folder / "d.txt").write_text("".join(f"{words} {i}\n" for i in range(60)))
    flags = [*TINY[2:], "--input_files", "d.txt", "--artefacts_dir", str(tmp_path / "art")]
    results = ranks_by_hand([flags, flags], folders=folders)
    for rank, (status, _, err) in enumerate(results):
        assert status == 2, err[-2000:]
        assert f"rank {1 - rank} read other text than rank {rank} with the same flags" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "art").exists()


def test_the_first_line_of_a_run_under_torchrun_names_its_ranks(tmp_path):
    loud = [flag for flag in TINY if flag != "--quiet"]
    flags = [*loud, "--models", "lstm_seq", "--epochs", "1", "--max_steps_per_epoch", "1",
             "--artefacts_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    (status, out, err), (other_status, other_out, _) = ranks_by_hand([flags, flags])
    assert status == other_status == 0, err[-2000:]
    assert out.splitlines()[0] == "device: cpu on rank 0, of 2 ranks (gloo)"
    assert other_out == ""                       # rank 0 alone prints


def test_ranks_started_with_other_flags_are_refused_before_they_train(pico, monkeypatch):
    """By hand, without torchrun: their collectives would not match, and gloo aborted rank 0
    (a C++ dump) while rank 1 ended in a traceback. A rank's own --device_id may differ."""
    flags = vars(pico.parse_args(["--models", "lstm_seq", "--device_id", "cpu"]))
    others = {**flags, "device_id": "cuda:1", "quiet": True}

    def all_gather_object(everyone, mine, group=None):
        assert group == "control"
        everyone[:] = [mine, {key: value for key, value in others.items()
                              if key not in pico.FLAGS_OF_THE_SAME_COMMAND}]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    context = pico.Distributed(rank=0, world_size=2, local_rank=0, control_group="control")
    pico.check_ranks_run_one_command(context, flags)
    others["max_steps_per_epoch"] = 5
    with pytest.raises(pico.UserError, match=r"rank 1 was started with other flags than rank 0 "
                                             r"\(--max_steps_per_epoch 5 there, None here\); "
                                             r"start every rank with the same command"):
        pico.check_ranks_run_one_command(context, flags)


def test_ranks_that_resume_other_checkpoints_are_refused_before_they_train(pico, monkeypatch):
    """--save_dir may differ between ranks (each reads its own; rank 0 alone writes): ranks
    given folders of other steps had each trained on from its own, rank 0 then waiting out
    --dist_timeout in a collective the other had no part in."""
    resumed = {"lstm_seq": (Path("a/lstm_seq/step_000003.pt"),
                            {"progress": {"step": 3}, "sha256": "abc12345ff"})}
    theirs = ["lstm_seq at step 3 (abc12345)"]

    def all_gather_object(everyone, mine, group=None):
        assert group == "control"
        everyone[:] = [mine, *theirs]

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    context = pico.Distributed(rank=0, world_size=2, local_rank=0, control_group="control")
    pico.check_ranks_resume_the_same_steps(context, resumed)
    for other in ("lstm_seq at step 6 (def00000)", "nothing",
                  "lstm_seq at step 3 (fed00000)"):              # the same step of another run
        theirs[:] = [other]
        with pytest.raises(pico.UserError, match=re.escape(
                f"rank 1 resumes {other}, rank 0 lstm_seq at step 3 (abc12345): other "
                "checkpoints; give every rank the same --save_dir")):
            pico.check_ranks_resume_the_same_steps(context, resumed)


def test_two_ranks_resuming_folders_of_other_steps_both_refuse(tmp_path):
    """The check above between two real processes, each given a --save_dir of its own."""
    flags = [*TINY, "--models", "lstm_seq", "--max_steps_per_epoch", "2",
             "--artefacts_dir", str(tmp_path / "art"), "--cache_dir", str(tmp_path / "cache")]
    first, second = tmp_path / "first", tmp_path / "second"
    for epochs, resume in (("1", []), ("2", ["--resume"])):   # the first run's step 2, then 4
        result = subprocess.run([sys.executable, str(SCRIPT), *flags, "--epochs", epochs,
                                 "--save_dir", str(second), "--run_name", "alone", *resume],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        if not resume:
            shutil.copytree(second, first)
    results = ranks_by_hand([[*flags, "--epochs", "3", "--save_dir", str(save_dir),
                              "--run_name", "both", "--resume"] for save_dir in (first, second)])
    for rank, (status, _, err) in enumerate(results):
        assert status == 2 and "Traceback" not in err, err[-2000:]
        assert re.search(f"rank {1 - rank} resumes lstm_seq at step {(4, 2)[rank]} \\(\\w+\\), "
                         f"rank {rank} lstm_seq at step {(2, 4)[rank]} \\(\\w+\\): other", err), err


def test_an_error_names_the_rank_only_where_there_is_one(pico, monkeypatch, capsys):
    """WORLD_SIZE set alone (no torchrun) has no rank: "(rank ?)" said nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert pico.error_line("bad") == 2
    assert capsys.readouterr().err == "pico-llm: error: bad\n"
    monkeypatch.setenv("RANK", "1")
    pico.error_line("bad")
    assert capsys.readouterr().err == "pico-llm: error (rank 1): bad\n"


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # state, ppid, ...
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
@pytest.mark.parametrize("who", ["one rank", "the terminal's process group"])
def test_a_signal_under_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(pico, tmp_path, who):
    """A signal may reach one rank only (kill), or every rank twice, not at the same step:
    Ctrl-C in a terminal signals the whole process group, torchrun included, which forwards
    it to its ranks. Either way the ranks agree on one step, rank 0 checkpoints it, all leave."""
    import os
    import signal
    import time
    if not Path("/proc/self/stat").exists():
        pytest.skip("finds the ranks through Linux's /proc")
    long_run = [a if a != "lstm_seq,transformer" else "lstm_seq" for a in TINY]
    long_run[long_run.index("--epochs") + 1] = "500"            # far longer than the test waits
    checkpoints = tmp_path / "ckpt" / "lstm_seq"
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", str(SCRIPT), *long_run, "--artefacts_dir",
                            str(tmp_path), "--save_dir", str(tmp_path / "ckpt"),
                            "--checkpoint_every", "5", "--keep_checkpoints", "1000",
                            "--dist_timeout", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)                # its own group, as a terminal's job
    try:
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("step_*.pt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(checkpoints.glob("step_*.pt")), "training never reached its first checkpoint"
        if who == "one rank":
            os.kill(max(child_pids(job.pid)), signal.SIGINT)
        else:
            os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=50)                     # under --dist_timeout: none waits
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    stops = [line for line in err.splitlines() if "interrupted by SIGINT at step" in line]
    assert len(stops) == 2, err[-3000:]                          # one line per rank
    steps = {line.split(" at step ")[1].split()[0] for line in stops}
    assert len(steps) == 1, stops                                # the same step on both ranks
    step = int(steps.pop())
    assert (checkpoints / f"step_{step:06d}.pt").exists()
    assert "to resume, rerun the same command with --resume" in err
    assert "rank 0 wrote the checkpoint" in err                 # rank 1 does not claim to
    assert pico.load_runlog(tmp_path / "run.json")["status"] == "interrupted"


def test_a_rank_left_waiting_for_the_others_says_so_before_it_gives_up(pico, monkeypatch, capfd):
    """torchrun's variables set by hand for one process: it waits --dist_timeout for ranks
    that never come, and says so after DIST_WAIT_NOTE_S rather than in silence."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(pico, "DIST_WAIT_NOTE_S", 0.5)
    monkeypatch.setattr(pico, "DIST_GIVE_UP_GRACE_S", 600.0)   # its exit would end the tests'
    with pytest.raises(pico.UserError, match="cannot join the torchrun job"):
        pico.setup_distributed("cpu", timeout_s=3.0)
    err = capfd.readouterr().err
    assert "waiting for the other ranks of WORLD_SIZE=2" in err and "--dist_timeout 3 s" in err


def test_a_step_sums_its_loss_over_the_ranks_on_the_device_before_its_one_read(pico, monkeypatch):
    """Under torchrun the step's loss is all-reduced where it lies and read with the gradient
    norm in one copy; a sum through Python floats would wait for a GPU a second time."""
    import copy
    import torch
    from test_models import VOCAB, tiny_model
    reduced = []

    def all_reduce(tensor, op=None):             # two ranks that saw the same batch
        reduced.append((tensor.dtype, tensor.shape))
        tensor.mul_(2)

    def no_python_sum(self, values, device):
        raise AssertionError("the step's loss went through Distributed.sum")

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(pico.Distributed, "sum", no_python_sum)
    model = tiny_model(pico, "transformer")
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, VOCAB, (17, 4), generator=torch.Generator().manual_seed(0))
    batch = pico.Batch(tokens[:-1], tokens[1:], torch.ones(16, 4, dtype=torch.bool))
    losses = []
    for step_model, context in ((model, pico.Distributed()), (twin, pico.Distributed(0, 2, 0))):
        optimizer = pico.build_optimizer(step_model, pico.TrainingConfig(), torch.device("cpu"))
        losses.append(pico.training_step(pico.NextTokenLoss(step_model), optimizer, [(batch, True)],
                                         64 * context.world_size, 1.0, context))
    assert reduced == [(torch.float32, torch.Size([]))]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_a_stand_in_micro_batch_of_a_rank_with_nothing_left_adds_nothing(pico):
    """A rank whose share of the epoch ran out still takes part in the step (DDP's all-reduce
    needs every rank) with a stand-in batch marked inactive: its loss and gradient count 0."""
    import torch
    from test_models import VOCAB, tiny_model
    tokens = torch.randint(0, VOCAB, (9, 2), generator=torch.Generator().manual_seed(0))
    real = pico.Batch(tokens[:-1], tokens[1:], torch.ones(8, 2, dtype=torch.bool))
    stand_in = pico.Batch(tokens[1:], tokens[:-1], torch.ones(8, 2, dtype=torch.bool))
    results = []
    for micro_batches in ([(real, True)], [(real, True), (stand_in, False)]):
        model = tiny_model(pico, "lstm_seq")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = pico.training_step(pico.NextTokenLoss(model), optimizer, micro_batches, 16, 0.0)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for alone, with_stand_in in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(with_stand_in, alone)


def test_more_ranks_on_a_machine_than_it_has_gpus_are_refused_in_one_line(pico, monkeypatch):
    """torchrun --nproc_per_node above the GPU count: the extra rank names the count, before
    torch.cuda.set_device would fail with CUDA's own trace."""
    import torch
    for name, value in {"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device_id in ("auto", "cuda:0"):
        with pytest.raises(pico.UserError, match=r"local rank 2 on a machine with 2 CUDA device"
                                                 r".*--nproc_per_node=2, or train on CPUs"):
            pico.setup_distributed(device_id, timeout_s=3.0)


def test_the_ranks_decide_to_stop_on_the_cpu_through_the_control_group(pico, monkeypatch):
    """After every step the ranks agree whether a signal came (maximum): a CPU tensor through
    the control group (gloo beside NCCL), so that the host does not wait for the GPU's queued
    step as a device tensor's all-reduce and read would make it."""
    seen = []

    def all_reduce(tensor, op=None, group=None):
        seen.append((tensor.device.type, group))
        tensor.fill_(15)                       # another rank's SIGTERM

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    control = object()
    context = pico.Distributed(rank=1, world_size=2, local_rank=1, control_group=control)
    assert context.maximum(0) == 15
    assert seen == [("cpu", control)]
    assert pico.Distributed().maximum(2) == 2 and len(seen) == 1    # one process: no collective


@pytest.mark.slow
def test_the_ranks_wait_at_the_end_for_rank_0_longer_than_the_dist_timeout(tmp_path):
    """Rank 0 alone writes the summary, interpretability files and export after training,
    which may take longer than --dist_timeout: the others wait for it at the end all the same."""
    probe = tmp_path / "probe.py"
    probe.write_text(probe_loading("pico", SCRIPT, "pico_llm") +
                     "import os, sys, time\n"
                     "real = pico.interpret_models\n"
                     "def slow(*args, **kwargs):\n"
                     "    time.sleep(10 if os.environ['RANK'] == '0' else 0)\n"
                     "    return real(*args, **kwargs)\n"
                     "pico.interpret_models = slow\n"
                     "sys.exit(pico.main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(probe), *TINY, "--dist_timeout", "6",
                             "--artefacts_dir", str(tmp_path / "art"),
                             "--cache_dir", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "art" / "run.json").exists()



def test_a_rank_waiting_for_one_that_failed_says_so_in_one_line(pico, monkeypatch):
    """A barrier on the control group whose peer died (its connections close) is a one-line
    error pointing at the other rank's, not a traceback."""
    def barrier(group=None):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
                           "closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(torch.distributed, "barrier", barrier)
    with pytest.raises(pico.UserError, match=r"^another rank stopped \(.*Connection closed by "
                                             r"peer.*\); its error says why$"):
        pico.Distributed(rank=1, world_size=2, local_rank=1).barrier()
    pico.Distributed().barrier()               # one process: nothing to wait for
    # main() says the same of any collective (a step's, an evaluation's): what tells them
    stalled = RuntimeError("[../gloo/pair.cc:1] Timed out waiting 10000ms for recv operation")
    for failure in (torch.distributed.DistNetworkError("x"), stalled,
                    RuntimeError("[../gloo/pair.cc:1] Connection reset by peer")):
        assert pico.peer_failure(failure)
    assert pico.another_rank_stopped(stalled) == ("another rank stopped answering (Timed out "
                                                  "waiting 10000ms for recv operation) within "
                                                  "--dist_timeout")
    for own in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"),   # this rank's
                torch.distributed.DistBackendError("NCCL error: CUDA out of memory")):
        assert not pico.peer_failure(own)


def test_ranks_that_cannot_open_their_cpu_group_say_so_in_one_line(pico, monkeypatch):
    """The ranks met (init_process_group) but the gloo group beside it cannot connect them (on
    several machines, gloo on the wrong network interface): one line naming the setting."""
    import torch.distributed as dist
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)

    def new_group(**kwargs):
        raise RuntimeError("Gloo connectFullMesh failed with ... no route to host")

    monkeypatch.setattr(dist, "new_group", new_group)
    with pytest.raises(pico.UserError, match=r"cannot open their CPU group \(Gloo connectFullMesh "
                                             r"failed.*\); on several machines, set "
                                             r"GLOO_SOCKET_IFNAME"):
        pico.setup_distributed("cpu", timeout_s=3.0)


def test_a_rank_other_than_0_draws_dropout_masks_of_its_own_from_the_step(pico):
    """Every rank builds its model from one seed, so without a seed of its own each draws
    rank 0's masks; drawn from (seed, rank, step), a resumed run draws the same again."""
    def masks(rank, step):
        torch.manual_seed(0)
        pico.Distributed(rank=rank, world_size=3).own_dropout_masks(7, step, torch.device("cpu"))
        return torch.rand(8)
    assert torch.equal(masks(1, 5), masks(1, 5))
    assert not torch.equal(masks(1, 5), masks(2, 5))
    assert not torch.equal(masks(1, 5), masks(1, 6))
    assert torch.equal(masks(0, 5), masks(0, 9))          # rank 0 draws on as one process does
    assert torch.equal(masks(0, 5), (torch.manual_seed(0), torch.rand(8))[1])


@pytest.mark.parametrize("dropout", ["0.0", "0.3"])
def test_training_on_a_rank_other_than_0_draws_other_dropout_masks(pico, configure, monkeypatch,
                                                                   dropout):
    """The training loop gives each rank its own masks: rank 1's losses differ from rank 0's
    with dropout (the same weights, examples and seed), and equal them without."""
    monkeypatch.setattr(pico.Distributed, "shard", lambda self, items: items)  # the same examples
    config = configure(*TINY, "--models", "transformer", "--dropout", dropout)
    tokenizer = pico.build_tokenizer("char")
    data = pico.load_training_data(config.data, tokenizer, pico.read_sources(config.data))
    history = {}
    for rank in (0, 1, 1):
        model = pico.build_model(config.models.config_of("transformer"), tokenizer.vocab_size, 0)
        record = pico.model_record("transformer", model, config.models.config_of("transformer"),
                                   24)
        pico.train_one_model("transformer", model, data, config.training, config.sampling,
                             torch.device("cpu"), tokenizer, record,
                             context=pico.Distributed(rank=rank))  # world of 1: nothing to sync
        history.setdefault(rank, []).append([h["train_loss"] for h in record["history"]])
    assert history[1][0] == history[1][1]                    # the same masks each time
    if dropout == "0.0":
        assert history[0][0] == history[1][0]
    else:
        assert history[0][0][0] != history[1][0][0]


@pytest.mark.slow
def test_two_ranks_with_dropout_resume_to_the_same_losses(pico, tmp_path):
    """Each rank's dropout masks come from the step, so two ranks resumed from step 3 train
    steps 4 to 8 as the run that was never stopped did."""
    common = [*TINY, "--models", "transformer", "--dropout", "0.3", "--cache_dir",
              str(tmp_path / "cache"), "--checkpoint_every", "3", "--keep_checkpoints", "10"]
    def torchrun(name, *extra):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", str(SCRIPT), *common, "--save_dir",
                                 str(tmp_path / f"ckpt_{name}"), "--artefacts_dir",
                                 str(tmp_path / name), *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return losses(pico, tmp_path / name / "run.json")["transformer"]
    whole = torchrun("whole")
    resumed = torchrun("resumed", "--resume", str(tmp_path / "ckpt_whole" / "transformer" /
                                                   "step_000003.pt"))
    assert resumed == whole


def test_no_model_keeps_a_buffer_that_training_changes(pico):
    """Under torchrun the wrapper sends no buffers from rank 0 before each forward: that holds
    only while every buffer is a constant, made from the model's settings alone (each rank
    builds the model from the same flags) and left as it was by training."""
    from test_models import VOCAB, all_tiny_models
    tokens = torch.randint(0, VOCAB, (17, 2), generator=torch.Generator().manual_seed(0))
    weights = torch.full((16, 2), 1 / 32)
    models = {name: model for name, model in all_tiny_models(pico).items()
              if any(True for _ in model.buffers())}
    assert len(models) > 10                  # RoPE's frequencies, linear attention's decays
    for name, model in models.items():
        before = {key: buffer.clone() for key, buffer in model.named_buffers()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        pico.NextTokenLoss(model)(tokens[:-1], tokens[1:], weights).backward()
        optimizer.step()
        for key, buffer in model.named_buffers():
            assert torch.equal(buffer, before[key]), (name, key)
    # The wrapper, in a process of its own: freeing DDP right after its last all-reduce can
    # deadlock in PyTorch's gloo teardown (the group's destructor waits, holding Python's
    # lock, for a thread that needs it to free the finished work), so the probe exits at once.
    probe = probe_loading("pico", SCRIPT, "pico_llm") + """
import os
import torch
import torch.distributed as dist
config = pico.TransformerConfig(d_model=32, n_heads=2, n_blocks=1, block_size=16)
model = pico.build_model(config, vocab_size=50, seed=0)
tokens = torch.randint(0, 50, (17, 2), generator=torch.Generator().manual_seed(0))
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
wrapped = pico.wrap_for_training(pico.NextTokenLoss(model), pico.Distributed(rank=0, world_size=2),
                                 torch.device("cpu"))
synced = []
wrapped._sync_buffers = lambda: synced.append(True)
wrapped(tokens[:-1], tokens[1:], torch.full((16, 2), 1 / 32)).backward()
print(type(wrapped).__name__, synced, flush=True)
os._exit(0)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["DistributedDataParallel", "[]"]
