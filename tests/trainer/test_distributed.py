"""Training under torchrun: CPU, gloo, 2 processes, tiny widths.

What must hold: the ranks keep bitwise identical weights while drawing distinct data and noise;
with --sync-bn, 2 processes x batch 4 train as 1 process x batch 8 on the same images and noise
(losses and weights within 1e-5 relative; measured: <= 7e-7); a checkpoint resumes under the other
world size (both ways) and continues as the one-process run does; Ctrl-C of one rank stops every
rank at the same step, and SIGTERM to one rank under torchrun does so within seconds with a
checkpoint that resumes bitwise; a killed or stalled rank ends the other within the process-group
timeout instead of hanging it.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from aigc_fast.training.cli import UsageError
from aigc_fast.training.data import BatchOrder
from aigc_fast.training.distributed import World, init_world
from aigc_fast.models import build_models
from aigc_fast.train import main
from aigc_fast.training.options import parse_args
from aigc_fast.training.run import setup

pytestmark = pytest.mark.slow  # see pyproject's markers

NZ, WIDTH = 8, 4
TINY = ["--ngf", str(WIDTH), "--ndf", str(WIDTH), "--nz", str(NZ), "--workers", "0",
        "--device", "cpu",
        "--backend", "eager", "--seed", "3"]
LAUNCH_TIMEOUT_S = 120  # a 2-process run of a few steps takes ~10 s here; this only stops a hang
METRICS = ("loss_d", "loss_g", "d_real", "d_fake")

# Runs the trainer's own main() and afterwards saves this rank's G and D, so the test can compare
# the ranks (rank 0's checkpoint alone would not show that rank 1 holds the same weights).
DUMPING_ENTRY = """
import os, sys, torch
from aigc_fast.training import train  # the command, whose run_training calls train.fit
from aigc_fast.training.cli import run_main
fit = train.fit
def fit_and_dump(run):
    status = fit(run)
    state = {"G": run.model.G.state_dict(), "D": run.model.D.state_dict()}
    torch.save(state, os.path.join(os.environ["DUMP_DIR"], f"rank{run.world.rank}.pt"))
    return status
train.fit = fit_and_dump
run_main(train.main, sys.argv[1:], prog="aigc_fast.train")
"""


@pytest.fixture(scope="module")
def npz(shapes_npz):
    """16 images: 2 global batches of 8 per epoch, so resuming at step 2 crosses an epoch."""
    return shapes_npz(16, seed=5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, npz):
    """The reference: 1 process x batch 8, 4 steps, a checkpoint after step 2."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(TINY + ["--data", npz, "--batch-size", "8", "--steps", "4", "--log-every", "1",
                        "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


def _child_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(argv, entry=("-m", "aigc_fast.train"), env=None):
    """``torchrun --standalone --nproc-per-node 2`` (a free port) of the trainer; its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *entry, *argv]
    done = subprocess.run(cmd, env=env or _child_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss_d" in r}


def _assert_rows_close(got, want, rtol):
    for step, row in got.items():
        for key in METRICS:
            assert row[key] == pytest.approx(want[step][key], rel=rtol), (step, key)


def _weights(path):
    ckpt = torch.load(path, weights_only=True)
    return {f"{m}.{k}": v for m in ("G", "D") for k, v in ckpt[m].items()}


def _assert_weights_close(a, b, rtol):
    assert a.keys() == b.keys()
    for key in a:
        if "num_batches_tracked" not in key:
            err = (a[key].double() - b[key].double()).norm() / b[key].double().norm()
            assert err <= rtol, (key, err.item())


# --- sharding and set-up, in this process ---------------------------------------------------------


def test_batch_order_shards_the_global_batch():
    """Rank r's batches are the r-th quarter of what one process with 4x the batch would take."""
    whole = BatchOrder(n=23, batch_size=8, seed=7)
    ranks = [BatchOrder(23, 2, seed=7, rank=r, world_size=4) for r in range(4)]
    assert all(o.steps_per_epoch == whole.steps_per_epoch == 2 for o in ranks)
    streams = [o.batches(1) for o in ranks]  # from step 1: resuming mid-way works the same
    for expected in _take(whole.batches(1), 4):  # steps 1-4 cross two epochs
        parts = [next(s) for s in streams]
        assert torch.equal(torch.cat(parts), expected)
        assert len(set(torch.cat(parts).tolist())) == 8  # disjoint shards
    with pytest.raises(UsageError,
                       match="--batch-size 8 x 4 processes is larger than the data set"):
        BatchOrder(n=23, batch_size=8, seed=0, rank=0, world_size=4)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_world_shards_noise_and_keeps_the_global_batch_on_resume():
    cpu = torch.device("cpu")
    rows = torch.randn(6, 3)
    assert torch.equal(World(cpu, rank=1, world_size=3).shard(rows), rows[2:4])
    assert World(cpu).shard(rows) is rows
    saved = {"batch_size": 4, "world_size": 2, "seed": 1}
    assert World(cpu).per_process_config(saved,
                                         "ckpt") == {"batch_size": 8, "world_size": 1, "seed": 1}
    assert World(cpu, 0, 4).per_process_config(saved, "ckpt")["batch_size"] == 2
    assert World(cpu, 0, 2).per_process_config({"batch_size": 8}, "ckpt")["batch_size"] == 4  # old
    with pytest.raises(UsageError,
                       match="ckpt: its global batch of 8 images does not split over 3"):
        World(cpu, 0, 3).per_process_config(saved, "ckpt")


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = init_world("cpu")
    assert world == World(torch.device("cpu")) and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UsageError, match="RANK=None: expected an integer, as torchrun sets it"):
        init_world("cpu")


def test_sync_bn_needs_the_eager_backend(npz):
    args, explicit = parse_args(TINY + ["--data", npz, "--batch-size", "4", "--sync-bn",
                                        "--backend", "compile"])
    with pytest.raises(UsageError, match="--sync-bn runs on the eager backend only; got --backend "
                                         "compile"):
        setup(args, explicit, World(torch.device("cpu"), rank=0, world_size=2, backend="gloo"))


# --- 2 processes under torchrun -------------------------------------------------------------------


def test_two_processes_hold_identical_weights_and_draw_distinct_shards(tmp_path, npz, one_process):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    (tmp_path / "entry.py").write_text(DUMPING_ENTRY)
    stdout = _torchrun(TINY
                       + ["--data", npz, "--batch-size", "4", "--steps", "3", "--log-every", "1",
                               "--out", str(out)],
                       entry=(str(tmp_path / "entry.py"),), env=_child_env(DUMP_DIR=str(dump)))
    assert stdout.count("batch 4 per process x 2 processes = 8 global (gloo)") == 1  # rank 0 alone

    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]
    G, D = build_models(32, NZ, WIDTH, WIDTH, 3)
    for name, module in (("G", G), ("D", D)):
        for key, _ in module.named_parameters():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), f"{name}.{key}"
        means = [k for k in ranks[0][name] if k.endswith("running_mean")]
        assert means  # per-process BatchNorm statistics: different images and noise on each rank
        for key in means:
            assert not torch.equal(ranks[0][name][key], ranks[1][name][key]), f"{name}.{key}"

    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    for name in ("G", "D"):  # rank 0's modules, plain keys: the file a single process writes
        assert ckpt[name].keys() == ranks[0][name].keys()
        assert all(torch.equal(v, ranks[0][name][k]) for k, v in ckpt[name].items())
    assert ckpt["config"]["batch_size"] == 4 and ckpt["config"]["world_size"] == 2
    rows = _rows(out)
    assert sorted(rows) == [1, 2, 3]  # one writer
    # per-process BatchNorm is not the one-process batch-8 run: the control for the --sync-bn test
    assert rows[1]["loss_d"] != pytest.approx(_rows(one_process)[1]["loss_d"], rel=1e-4)


def test_sync_bn_two_by_four_is_one_by_eight_and_resumes_both_ways(tmp_path, npz, one_process):
    reference = _rows(one_process)
    final = _weights(one_process / "checkpoints" / "last.pt")

    # 2 processes x 4 with --sync-bn, steps 1-2: the same global batches and noise as 1 x 8
    two = tmp_path / "two"
    _torchrun(TINY + ["--data", npz, "--batch-size", "4", "--steps", "2", "--log-every", "1",
                      "--sync-bn", "--out", str(two)])
    _assert_rows_close(_rows(two), reference, rtol=1e-5)
    assert torch.load(two / "checkpoints" / "last.pt", weights_only=True)["config"]["sync_bn"]

    # ... resumed in 1 process (batch 8 per process now), steps 3-4
    assert main(["--resume", str(two / "checkpoints" / "last.pt"), "--steps", "4", "--workers",
                 "0"]) == 0
    resumed = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == 4
    assert (resumed["config"]["batch_size"], resumed["config"]["world_size"]) == (8, 1)
    assert sorted(_rows(two)) == [1, 2, 3, 4]
    _assert_rows_close(_rows(two), reference, rtol=1e-5)
    _assert_weights_close(_weights(two / "checkpoints" / "last.pt"), final, rtol=1e-5)

    # the reverse: 1 x 8's checkpoint of step 2, resumed in 2 processes x 4 with --sync-bn
    reverse = tmp_path / "reverse" / "checkpoints"
    reverse.mkdir(parents=True)
    shutil.copy(one_process / "checkpoints" / "step_000002.pt", reverse / "last.pt")
    _torchrun(["--resume", str(reverse / "last.pt"), "--steps", "4", "--sync-bn", "--workers", "0",
               "--device", "cpu", "--backend", "eager"])
    resumed = torch.load(reverse / "last.pt", weights_only=True)
    assert (resumed["step"], resumed["config"]["batch_size"],
            resumed["config"]["world_size"]) == (4, 4, 2)
    assert sorted(_rows(reverse.parent)) == [3, 4]
    _assert_rows_close(_rows(reverse.parent), reference, rtol=1e-5)
    _assert_weights_close(_weights(reverse / "last.pt"), final, rtol=1e-5)


# --- interruptions and failures: two ranks started as torchrun starts them ------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Ranks:
    """Two trainer processes with torchrun's environment (no agent that would clean up for them)."""

    def __init__(self, tmp_path, npz, extra):
        self.out, port = tmp_path / "run", str(_free_port())
        argv = TINY + ["--data", npz, "--batch-size", "2", "--steps", "100000", "--out",
                       str(self.out),
                       *extra]
        self.logs = [tmp_path / f"rank{r}.log" for r in range(2)]
        self.procs = []
        for rank, log in enumerate(self.logs):
            env = _child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                             RANK=str(rank),
                             LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "aigc_fast.train", *argv],
                                                   env=env, stdout=f, stderr=subprocess.STDOUT))

    def wait_for_training(self, deadline_s=LAUNCH_TIMEOUT_S):
        """Until rank 0 logged a step: both ranks are past set-up and inside the loop."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            assert all(p.poll() is None for p in self.procs), self.output()
            if (self.out / "metrics.jsonl").exists() and _rows(self.out):
                return
            time.sleep(0.2)
        raise AssertionError("training did not start:\n" + self.output())

    def wait(self, rank, timeout_s):
        """(exit status, seconds it took) of ``rank``; fails if it is still running after
        timeout_s."""
        t0 = time.monotonic()
        try:
            status = self.procs[rank].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank {rank} still running after {timeout_s} s:\n"
                                 + self.output())
        return status, time.monotonic() - t0

    def output(self):
        return "\n".join(f"--- rank {r}\n{log.read_text()[-2000:]}" for r,
                         log in enumerate(self.logs))

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def ranks(tmp_path, npz):
    started = []

    def start(*extra):
        started.append(_Ranks(tmp_path, npz, extra))
        return started[-1]

    yield start
    for r in started:
        r.close()


def test_ctrl_c_on_one_rank_stops_both_at_the_same_step(ranks):
    job = ranks("--log-every", "3", "--dist-timeout", "60")
    job.wait_for_training()
    # rank 1 only: rank 0 learns of it at the next agreement
    job.procs[1].send_signal(signal.SIGINT)
    assert job.wait(1, 60)[0] == 130 and job.wait(0, 60)[0] == 130, job.output()
    step = torch.load(job.out / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert max(_rows(job.out)) == step  # the stopped step is logged with its checkpoint
    log0 = job.logs[0].read_text()
    assert f"interrupted at step {step}/100000" in log0 \
        and "interrupted" not in job.logs[1].read_text()


def test_a_killed_rank_ends_the_other_within_the_timeout(ranks):
    timeout = 30
    job = ranks("--log-every", "1", "--dist-timeout", str(timeout))
    job.wait_for_training()
    job.procs[0].kill()  # rank 0 also hosts the rendezvous store
    status, _ = job.wait(1, timeout)
    assert status not in (0, None), job.output()


def test_a_stalled_rank_ends_the_other_after_the_timeout(ranks):
    timeout = 8
    job = ranks("--log-every", "1", "--dist-timeout", str(timeout))
    job.wait_for_training()
    job.procs[1].send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can notice
    try:
        status, seconds = job.wait(0, timeout + 20)
    finally:
        job.procs[1].kill()
    assert status not in (0, None), job.output()
    assert seconds >= timeout * 0.5, seconds  # it waited for the peer, then gave up


# --- SIGTERM under a real torchrun agent ----------------------------------------------------------


def _worker_pids(agent):
    """{rank: pid} of the trainer processes a torchrun agent started (from Linux's /proc)."""
    pids = {}
    for pid in open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split():
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        pids.update({int(v[5:]): int(pid) for v in env if v.startswith(b"RANK=")})
    return pids


def test_sigterm_to_one_torchrun_rank_checkpoints_within_seconds_and_resumes_bitwise(tmp_path, npz):
    total = 400  # the signal comes at step 10 or later; both ranks stop about a second after it
    common = TINY + ["--data", npz, "--batch-size", "2", "--log-every", "10", "--checkpoint-every",
                     str(total), "--eval-every", "0", "--steps", str(total)]
    _torchrun(common + ["--out", str(tmp_path / "straight")])
    split, log = tmp_path / "split", tmp_path / "split.log"
    with open(log, "w") as f:
        agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", "2", "-m", "aigc_fast.train",
                                  *common, "--out",
                                  str(split)], env=_child_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + LAUNCH_TIMEOUT_S
        while not ((split / "metrics.jsonl").exists() and _rows(split)):
            assert agent.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(_worker_pids(agent)[1], signal.SIGTERM)  # rank 1 only, as a node's scheduler may
        t0 = time.monotonic()
        status = agent.wait(timeout=LAUNCH_TIMEOUT_S)
        seconds = time.monotonic() - t0
    finally:
        if agent.poll() is None:
            agent.kill()
    output = log.read_text()
    last = split / "checkpoints" / "last.pt"
    step = torch.load(last, weights_only=True)["step"]
    assert status != 0 and seconds < 10 and 10 <= step < total, (seconds, step, output[-3000:])
    assert f"interrupted at step {step}/{total} (SIGTERM)" in output and "exitcode  : 143" in output
    _torchrun(["--resume", str(last)])
    straight = _weights(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = _weights(last)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
