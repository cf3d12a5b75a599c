"""Multi-node for real, on one machine: two `accelerate launch` invocations with
launch/multinode.yaml (`--num_machines 2 --machine_rank 0/1`, gloo on localhost) train as one
job, keep identical weights, resume together, and the death of one "node" stops the other."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from pix2pix_dist.checkpoints import list_checkpoints
from conftest import free_port
from test_reliability import children, launch, running, wait_for
from test_training import TINY


def start_nodes(script: list[str], logs: list, port: int) -> list:
    """Node 0 and node 1, one process each, as multinode.yaml starts them on two machines."""
    return [launch(script, log, options=[
        "--config_file", "launch/multinode.yaml", "--num_machines", "2", "--num_processes", "2",
        "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port)]) for rank, log in enumerate(logs)]


@pytest.mark.slow
def test_two_nodes_train_as_one_resume_together_and_stop_together(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, f"data.shards={sample_shards}", f"run_dir={run_dir}", "log.every=1",
            "log.tracker=none"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]

    nodes = start_nodes(["tests/ddp_worker.py", str(tmp_path), *args, "train.steps=4",
                         "ckpt.every=2"], logs, free_port())
    for node, log in zip(nodes, logs):
        assert node.wait(timeout=300) == 0, log.read_text()[-3000:]
    views = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [v["world"] for v in views] == [2, 2] and [v["step"] for v in views] == [4, 4]
    assert not set(views[0]["batch_sums"]) & set(views[1]["batch_sums"])  # each node its share
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for net in ("G", "D"):
        params = [k for k in states[0][net] if "running" not in k and "num_batches" not in k]
        assert params and all(torch.equal(states[0][net][k], states[1][net][k]) for k in params)

    # The rerun resumes on both nodes; then node 1 dies whole (launcher and rank, like a
    # machine that loses power): node 0 must notice and stop on its own within a bound.
    nodes = start_nodes(["train.py", *args, "train.steps=100000", "ckpt.every=100000"], logs,
                        free_port())
    try:
        wait_for(logs[0], "step 6/100000", nodes[0])
        assert f"resumed from {run_dir / 'checkpoints' / 'step-00000004'} at step 4" in logs[0].read_text()
        survivor, dying = children(nodes[0].pid), children(nodes[1].pid)
        assert len(survivor) == len(dying) == 1
        for pid in (nodes[1].pid, *dying):  # torch's agent starts each rank in its own session
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        nodes[0].wait(timeout=120)
        assert time.monotonic() - killed < 60
        assert not any(running(pid) for pid in survivor)
    finally:
        for node in nodes:
            if node.poll() is None:
                for pid in (node.pid, *children(node.pid)):
                    os.kill(pid, signal.SIGKILL)
            node.wait()
    assert nodes[0].returncode != 0
    out = logs[0].read_text()
    assert "[rank 0] stopped: another training process failed or was killed" in out
    assert "[rank0]: Traceback" not in out
    # The last complete checkpoint is still there for the next rerun.
    assert [p.name for p in list_checkpoints(run_dir)][-1] == "step-00000004"
