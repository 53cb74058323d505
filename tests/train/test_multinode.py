"""Multi-node by simulation (issue 16): two torchrun launchers on this host, one process each,
meeting through the c10d rendezvous on 127.0.0.1, train like 1 node x 2 processes (bit for
bit); one "node" killed with kill -9 mid-run, then both relaunched with resume=true, end
where the uninterrupted run ends; and with --max-restarts=1, one node's worker killed with
kill -9, torchrun's restart on both nodes ends there too."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from processes import run_process_group
from test_reliability import _assert_same_run, _env, _processes_with, full_run  # noqa: F401
from test_train import _free_port, tiny  # noqa: F401

ARGS = dict(global_batch_size=8, micro_batch_size=3, policy_lr=1e-3, value_lr=1e-3, beta=0.1,
            kl_coef=0.05, progress="false", epochs=3, threads=1)


def _node(root, out, port, *extra, launcher=()):
    """One simulated node: a torchrun launcher with one worker, 2 nodes in the job."""
    args = dict(policy=root / "policy", reference=root / "ref", train_file=root / "traj.jsonl",
                output_dir=out, **ARGS)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=oreo-test",
            "--local-addr=127.0.0.1", *launcher, "-m", "oreo_fast.train",
            *[f"{k}={v}" for k, v in args.items()], *extra]


def _start(cmd, env, stderr=subprocess.PIPE):
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)


def _two_nodes(root, out, *extra, env=None, timeout=300):
    """Both nodes to the end; (return codes, stderr of each)."""
    port = _free_port()
    env = env or _env(GLOO_SOCKET_IFNAME="lo")
    nodes = [_start(_node(root, out, port, *extra), env) for _ in range(2)]
    results = []
    try:
        for node in nodes:
            _, err = node.communicate(timeout=timeout)
            results.append((node.returncode, err))
    finally:
        for node in nodes:
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait()
    return results


@pytest.mark.slow
def test_two_nodes_equal_one_node_with_two_processes(tiny, full_run, tmp_path):  # noqa: F811
    root, _, _ = tiny
    out = tmp_path / "nodes"
    for code, err in _two_nodes(root, out, "save_every=3"):
        assert code == 0, err[-3000:]
    _assert_same_run(full_run, out)
    assert (out / "checkpoints" / "step-6" / "__1_0.distcp").is_file()  # both nodes wrote


@pytest.mark.slow
def test_kill_9_one_node_then_resume_on_two_nodes(tiny, full_run, tmp_path):  # noqa: F811
    root, _, _ = tiny
    out = tmp_path / "killed"
    port = _free_port()
    env = _env(GLOO_SOCKET_IFNAME="lo", OREO_FAULT_STEP_DELAY_S="0.4")
    extra = ("save_every=1", "keep_checkpoints=2", "collective_timeout_s=20")
    first = _start(_node(root, out, port, *extra), env)
    time.sleep(1.0)  # the first one hosts the rendezvous store; the second one is killed
    second = _start(_node(root, out, port, *extra), env)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step-2" / "manifest.json").is_file():
            assert first.poll() is None and second.poll() is None, second.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.02)
        os.killpg(second.pid, signal.SIGKILL)  # the whole "node": launcher (+ its worker)
        second.wait()
        _, err = first.communicate(timeout=120)  # the surviving node fails, bounded
        assert first.returncode != 0
    finally:
        for node in (first, second):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    deadline = time.time() + 15
    while _processes_with(f"output_dir={out}") and time.time() < deadline:
        time.sleep(0.05)
    assert not _processes_with(f"output_dir={out}"), "workers outlived their launcher"
    assert not (out / "policy").exists()
    for code, err in _two_nodes(root, out, "save_every=1", "keep_checkpoints=2", "resume=true"):
        assert code == 0, err[-3000:]
    _assert_same_run(full_run, out)


def _workers_of(launcher_pid: int) -> list[int]:
    """Pids of the trainer workers a torchrun launcher has started (its children)."""
    pids = []
    for pid in _processes_with("oreo_fast.train"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == launcher_pid:
            pids.append(pid)
    return pids


@pytest.mark.slow
def test_max_restarts_across_two_nodes_after_kill_9_of_one_worker(tiny, full_run, tmp_path):  # noqa: F811
    """--max-restarts=1 on 2 simulated nodes: one node's worker is killed with kill -9 after
    checkpoint step-3; torchrun restarts both nodes' workers, which meet again (the attempt
    number is agreed through the store, not taken from each node's own restart count) and
    resume from the newest complete checkpoint to the uninterrupted run's end, bit for bit."""
    root, _, _ = tiny
    out = tmp_path / "restarted"
    port = _free_port()
    env = _env(GLOO_SOCKET_IFNAME="lo", OREO_FAULT_STEP_DELAY_S="0.4", LOGLEVEL="INFO")
    cmd = _node(root, out, port, "save_every=1", "keep_checkpoints=2", "resume=true",
                "collective_timeout_s=60", launcher=("--max-restarts=1",))
    logs = [tmp_path / f"node{i}.log" for i in range(2)]  # files: INFO logs could fill a pipe
    first = _start(cmd, env, stderr=logs[0].open("w"))
    time.sleep(1.0)  # the first one hosts the rendezvous store; the second one's worker dies
    second = _start(cmd, env, stderr=logs[1].open("w"))
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "step-3" / "manifest.json").is_file():
            assert first.poll() is None and second.poll() is None, logs[1].read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.02)
        victims = _workers_of(second.pid)
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        for node, log in zip((first, second), logs):
            node.wait(timeout=240)
            assert node.returncode == 0, log.read_text()[-3000:]
    finally:
        for node in (first, second):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    errors = [log.read_text() for log in logs]
    assert "exitcode: -9" in errors[1]  # the killed worker was seen, and restarted
    for node, err in enumerate(errors):  # which attempt each node's launcher counted
        print(f"node {node}:", re.findall(r"restart_count=\d+", err))
    _assert_same_run(full_run, out)


def test_ranks_agree_on_a_fresh_attempt_number_despite_stale_keys():
    """agree_on_attempt over one store across "restarts": every rank of an attempt gets the
    same number, a new one each time, although the previous attempt's tokens and answers are
    still in the store and the ranks arrive in any order (rank 0 first answers the stale
    tokens of the previous attempt, then the fresh ones)."""
    import datetime
    import threading

    import torch.distributed as dist

    from oreo_fast.train.distributed import agree_on_attempt

    store, timeout = dist.HashStore(), datetime.timedelta(seconds=20)
    seen = []
    for order in ((2, 1, 0), (0, 1, 2), (0, 2, 1)):
        results = {}

        def join(rank):
            results[rank] = agree_on_attempt(store, rank, 3, timeout, poll_s=0.005)

        threads = [threading.Thread(target=join, args=(r,)) for r in order]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(timeout=30)
        assert sorted(results) == [0, 1, 2] and len(set(results.values())) == 1, results
        seen.append(results[0])
    assert len(set(seen)) == 3
