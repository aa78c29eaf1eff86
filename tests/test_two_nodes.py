"""`altgrad sweep --address` against a real two-node Ray cluster, both nodes on this machine.

The head and the second node are `ray start --block` processes in their own process groups, with
their own temp dir, ports and auth token; the test stops exactly those groups at the end."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest
import yaml

from tests.test_sweep import TINY_TRIAL, assert_complete


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 120) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, env=env)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise TimeoutError(f"{count} Ray nodes did not come up at {address}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group of one `ray start --block`, then SIGKILL whatever of it is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group_alive(process.pid):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)  # reap the leader, or it lingers as a zombie member of the group
        except subprocess.TimeoutExpired:
            continue
        deadline = time.time() + 10
        while group_alive(process.pid) and time.time() < deadline:
            time.sleep(0.2)
        if not group_alive(process.pid):
            return


@pytest.fixture
def two_node_cluster():
    temp = tempfile.mkdtemp(prefix="ar", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block", "--disable-usage-stats"]
    head = subprocess.Popen(["ray", "start", "--head", "--port", str(port), "--temp-dir", temp,
                             "--include-dashboard", "false", *common], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = [head]
    try:
        address = f"127.0.0.1:{port}"
        wait_for_nodes(address, 1, env)
        processes.append(subprocess.Popen(["ray", "start", "--address", address, *common], env=env,
                                          start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        wait_for_nodes(address, 2, env)
        yield address, env
    finally:
        for process in reversed(processes):
            stop_group(process)
        shutil.rmtree(temp, ignore_errors=True)
    assert not any(group_alive(process.pid) for process in processes)  # exactly those processes are gone


def test_a_sweep_on_an_existing_two_node_cluster_uses_both_nodes(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "two", "trial": TINY_TRIAL, "resources": {"cpu": 1},
                                    "matrix": {"format": ["E4M3", "E2M5", "E5M2", "E3M4"]}}))
    result = subprocess.run([sys.executable, "-m", "altgrad.cli", "sweep", str(path), "--out", str(tmp_path / "out"),
                             "--address", address], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = assert_complete(tmp_path / "out" / "two", 4)["trials"]
    assert trials["node_id"].nunique() == 2, trials[["trial_id", "node_id"]]
    assert (pd.read_parquet(tmp_path / "out" / "two" / "trials")["status"] == "completed").all()
