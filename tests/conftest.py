"""Shared fixtures for the stage-script tests: the repository on sys.path, one intra-op thread, and
a tiny tokenizer trained once per session by `dvae.main` (the checkpoint pretrain.py reads via --dvae)."""
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `pytest tests/` as well as `python -m pytest` from the repo root

# Tiny models on a shared 2-core machine: with 2 OpenMP threads a step that takes 10 ms alone took
# 2.5 s while other processes held the cores (threads spin at every barrier). One thread is
# deterministic and fast; subprocesses get OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)

# dvae.py's small preset shrunk: group_count 3 -> f = 4, so 16 px images give 4 x 4 tokens.
TINY_DVAE = ["--preset", "small", "--n-hid", "8", "--vocab-size", "64", "--img-size", "16",
             "--batch-size", "16", "--num-workers", "0", "--device", "cpu"]


def free_port():
    """A TCP port free at the moment, for a torchrun rendezvous in a test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env():
    """Environment for child Python processes: the repo importable, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def torchrun(argv, nproc=2, cwd=REPO, timeout=240):
    """What `torchrun --nproc_per_node NPROC argv` runs, without the launcher process: NPROC Python
    processes with the environment torchrun gives each (RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The launcher itself costs ~1.2 s of CPU a call;
    test_pretrain.py's two-process run keeps it. A rank that fails stops the others (they would
    wait at their next collective). Returns one CompletedProcess: the first failure's exit status
    (else 0), and every rank's stdout and stderr, in rank order."""
    port, procs, logs = str(free_port()), [], []
    for rank in range(nproc):
        env = dict(subprocess_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        logs.append((tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")))  # no pipe to fill
        procs.append(subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=env,
                                      stdout=logs[-1][0], stderr=logs[-1][1], text=True))
    deadline, status = time.time() + timeout, 0
    while any(p.poll() is None for p in procs):
        status = status or next((p.returncode for p in procs if p.returncode), 0)
        if status or time.time() > deadline:
            for p in procs:
                p.kill()
            status = status or -9
        time.sleep(0.02)
    status = status or next((p.returncode for p in procs if p.returncode), 0)
    stdout, stderr = "", ""
    for rank, (out, err) in enumerate(logs):
        out.seek(0), err.seek(0)
        stdout += f"[rank {rank}]\n{out.read()}"
        stderr += f"[rank {rank}]\n{err.read()}"
        out.close(), err.close()
    return subprocess.CompletedProcess(argv, status, stdout, stderr)


@pytest.fixture(scope="session")
def tiny_dvae_ckpt(tmp_path_factory):
    """Path of a dvae.py checkpoint (3 steps of the tiny config): a frozen tokenizer for pretrain.py
    at --img-size 16 --patch-size 4 (grid 4, tokenizer view 4 * 4 = 16 px), vocabulary 64."""
    import dvae

    out = tmp_path_factory.mktemp("tiny_dvae")
    dvae.main(dvae.get_args_parser().parse_args(
        TINY_DVAE + ["--output-dir", str(out), "--max-steps", "3", "--warmup-steps", "1"]))
    return str(out / "checkpoint-latest.pth")


def refused(parser, argv, capsys):
    """argv refused as every stage refuses a bad flag: exit status 2, one line on stderr,
    `SCRIPT: error: ...`, before any work; returns that line."""
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([str(a) for a in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{parser.prog}: error: "), err
    return err


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, tiny_dvae_ckpt):
    """One real pre-training run per test run (2 CIM steps, vit_mini at 16 px, patch 4): its
    checkpoint-latest.pth and backbone.pth, the --init of the downstream tests."""
    import pretrain

    out = tmp_path_factory.mktemp("pretrain")
    pretrain.main(pretrain.get_args_parser().parse_args(
        ["--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--gen-dim", "32", "--gen-depth", "1",
         "--gen-heads", "2", "--arch", "vit_mini", "--knn-k", "0", "--num-workers", "0", "--device", "cpu",
         "--min-tokenizer-perplexity", "0", "--dvae", tiny_dvae_ckpt, "--output-dir", str(out),
         "--max-steps", "2", "--lr", "1e-3", "--warmup-epochs", "0"]))
    return out


def pytest_collection_modifyitems(items):
    """The README paper-path runs (a minute each on two cores) go first: `-n auto --dist worksteal`
    then starts them at once on separate workers and spreads the short tests around them."""
    slow = [item for item in items if item.get_closest_marker("paper_path")]
    items[:] = slow + [item for item in items if item not in slow]
