"""Multi-node by simulation (issue 16): two torchrun launchers on this host, one process each,
meeting through the c10d rendezvous on 127.0.0.1, train like 1 node x 2 processes (bit for
bit); one "node" killed with kill -9 mid-run, then both relaunched with resume=true, end
where the uninterrupted run ends."""
import os
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


def _node(root, out, port, *extra):
    """One simulated node: a torchrun launcher with one worker, 2 nodes in the job."""
    args = dict(policy=root / "policy", reference=root / "ref", train_file=root / "traj.jsonl",
                output_dir=out, **ARGS)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=oreo-test",
            "--local-addr=127.0.0.1", "-m", "oreo_fast.train",
            *[f"{k}={v}" for k, v in args.items()], *extra]


def _start(cmd, env):
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


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
