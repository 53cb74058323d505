import os
import time

from processes import run_process_group


def test_run_process_group_leaves_no_orphan():
    """A child the command leaves running in the background is killed with the group."""
    done = run_process_group(["bash", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], timeout=30)
    child = int(done.stdout.split()[0])
    assert done.returncode == 0
    for _ in range(50):  # SIGKILL is asynchronous; reaped by init shortly after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":  # a zombie has already died
                return
        time.sleep(0.1)
    raise AssertionError(f"background child {child} still alive")
