"""Launching torchrun from tests without leaving orphans behind."""
import os
import signal
import subprocess


def run_process_group(cmd, *, timeout, env=None, capture_output=True, text=True):
    """``subprocess.run`` for launchers: the command gets its own session and the whole group
    is killed afterwards, so a failed or timed-out test leaves no orphaned worker behind (one
    stuck in a gloo connect made every later torchrun test on the machine fail)."""
    pipe = subprocess.PIPE if capture_output else None
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=pipe, stderr=pipe,
                            text=text)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the group has already exited
        if proc.returncode is None:
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
