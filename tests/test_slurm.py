"""launch/slurm.sbatch for real on one machine: stand-ins for `srun` and `scontrol` on PATH and
SLURM's environment (one node, two gloo processes). A run stopped by SIGTERM (what
`--signal=TERM@120` sends every process of the step) is requeued exactly once; a finished or
failed run is not, whatever an earlier job left in status.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env, free_port
from test_reliability import children, wait_for
from test_training import TINY

SRUN = """#!/bin/bash
# srun stand-in: one task on node 0; options are ignored.
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
SCONTROL = """#!/bin/bash
# scontrol stand-in: one host; requeues are recorded, not done.
case "$1" in
  show) echo localhost ;;
  requeue) echo "requeue $2" >> "$REQUEUE_LOG" ;;
  *) exit 1 ;;
esac
"""


def sbatch(tmp_path: Path, run_dir: Path, args: list[str], log: Path) -> subprocess.Popen:
    """Start the batch script as SLURM would on the first node of a one-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{clean_env()['PATH']}", SLURM_JOB_ID="4242",
                    SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", GPUS_PER_NODE="2",
                    MASTER_PORT=str(free_port()), VENV=str(Path(sys.executable).parent.parent),
                    REQUEUE_LOG=str(tmp_path / "requeues.log"))
    with open(log, "w") as out:
        # Its own process group, as SLURM's batch shell has: a signal to the group reaches the
        # shell and the launcher (the ranks run in a session of their own).
        return subprocess.Popen(["bash", "launch/slurm.sbatch", "PRESET=cpu-demo",
                                 f"RUN_DIR={run_dir}", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def requeues(tmp_path: Path) -> list[str]:
    path = tmp_path / "requeues.log"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("signalled", ["the step's processes", "the batch shell's process group"])
def test_a_run_stopped_by_sigterm_is_requeued_once(sample_shards, tmp_path, signalled):
    """`--signal=TERM@120` signals the step's processes; `--signal=B:TERM@120`, `scancel
    --signal=TERM --full` or a preemption also reach the batch shell, which must outlive the
    step to requeue it."""
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(tmp_path, run_dir, [*TINY, f"data.shards={sample_shards}", "train.steps=100000",
                                     "log.every=1", "log.tracker=none"], log)
    try:
        wait_for(log, "step 2/100000", job)
        if signalled == "the batch shell's process group":
            os.killpg(job.pid, signal.SIGTERM)
        for pid in descendants(job.pid) if signalled == "the step's processes" else []:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    assert "stopped by signal at step" in log.read_text()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    assert requeues(tmp_path) == ["requeue 4242"]


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["finished", "failed"])
def test_a_finished_or_failed_run_is_not_requeued(sample_shards, tmp_path, outcome):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    run_dir.mkdir()
    # What an earlier, stopped job of the same run left behind must not requeue this one.
    (run_dir / "status.json").write_text(json.dumps({"state": "stopped", "step": 1}))
    shards = sample_shards if outcome == "finished" else tmp_path / "no-shards"
    job = sbatch(tmp_path, run_dir, [*TINY, f"data.shards={shards}", "train.steps=2",
                                     "log.tracker=none"], log)
    rc = job.wait(timeout=300)
    assert requeues(tmp_path) == []
    if outcome == "finished":
        assert rc == 0, log.read_text()[-3000:]
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    else:
        assert rc != 0
        assert "error: " in log.read_text() and not (run_dir / "status.json").exists()
