"""Failures a user meets: a killed launcher, an error on one rank, a second training on the same
run folder, a full disk, a read-only run folder, weights that turn NaN.

Every run is a real subprocess (train.py or a 2-process gloo `accelerate launch`); faults are
injected deterministically: the tests wait for log lines, never race a timer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, clean_env, free_port, run_python
from pix2pix_dist.checkpoints import list_checkpoints
from test_training import TINY

ACCELERATE = Path(sys.executable).with_name("accelerate")


def launch(script: list[str], log: Path, *, options: list[str] | None = None) -> subprocess.Popen:
    """`accelerate launch` (default: two gloo processes on this machine), output of the launcher
    and its ranks into `log`."""
    if options is None:
        options = ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())]
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(ACCELERATE), "launch", *options, *script], cwd=REPO,
            env=clean_env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}"), stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Block until `text` is in the log (the processes reached that point); its time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return time.monotonic()
        assert proc.poll() is None or text in log.read_text(), log.read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen in {timeout} s:\n{log.read_text()[-3000:]}")


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by init, maybe later)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in lines if line.startswith("error: ")]
    return line


def test_killed_launcher_stops_its_ranks_and_a_running_training_holds_its_folder(sample_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    args = [*TINY, f"data.shards={sample_shards}", f"run_dir={run_dir}", "train.steps=100000",
            "log.every=1", "ckpt.every=100000", "log.tracker=none"]
    launcher = launch(["train.py", *args], log)
    try:
        wait_for(log, "step 2/100000", launcher)  # both ranks are in the loop
        ranks = children(launcher.pid)
        assert len(ranks) == 2

        second = run_python(["train.py", *args])  # a second training on the same folder
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert f"{run_dir} is in use by another training (pid " in line
        assert second.stdout == ""  # refused before data, models or checkpoints were loaded

        launcher.kill()  # SIGKILL: the launcher cannot pass anything on to its ranks
        launcher.wait()
        killed = time.monotonic()
        while any(running(pid) for pid in ranks) and time.monotonic() - killed < 60:
            time.sleep(0.1)
        assert not any(running(pid) for pid in ranks), "ranks outlived their launcher"
        assert time.monotonic() - killed < 30
    finally:
        for pid in [launcher.pid, *locals().get("ranks", [])]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    # They stopped as on SIGTERM: a checkpoint and status.json say where, for the rerun.
    assert "stopped by signal at step" in log.read_text()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    assert len(list_checkpoints(run_dir)) == 1


def importing_torch(pid: int) -> bool:
    """The process has begun `import torch` (so it imported pix2pix_dist, which notes its
    launcher); seconds of imports still lie between it and the rendezvous."""
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
def test_ranks_whose_launcher_dies_during_their_start_up_exit_at_once(sample_shards, tmp_path):
    """The launcher is SIGKILLed while its ranks are still importing (they are frozen meanwhile,
    so no timing decides it): they must stop, not wait in the rendezvous for 30 minutes."""
    log = tmp_path / "launch.log"
    launcher = launch(["train.py", *TINY, f"data.shards={sample_shards}", f"run_dir={tmp_path / 'run'}",
                       "train.steps=5", "log.tracker=none"], log)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (len(ranks) == 2 and all(importing_torch(pid) for pid in ranks)):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            ranks = children(launcher.pid)
            time.sleep(0.01)
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        launcher.kill()
        launcher.wait()
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        while any(running(pid) for pid in ranks) and time.monotonic() - resumed < 120:
            time.sleep(0.1)
        assert not any(running(pid) for pid in ranks), log.read_text()[-3000:]
    finally:
        for pid in [launcher.pid, *ranks]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    out = log.read_text()
    assert out.count("exited while this process started; stopping") == 2, out[-3000:]
    assert "Traceback" not in out and not (tmp_path / "run" / "checkpoints").exists()


def test_an_error_on_one_rank_reaches_the_user_as_that_ranks_line(sample_shards, tmp_path):
    log = tmp_path / "launch.log"
    launcher = launch(["tests/ddp_worker.py", "--fail", "1:3", *TINY, f"data.shards={sample_shards}",
                       f"run_dir={tmp_path / 'run'}", "train.steps=50", "log.every=1",
                       "log.tracker=none"], log)
    try:
        failed = wait_for(log, "error: [rank 1]", launcher)
        launcher.wait(timeout=120)
        assert time.monotonic() - failed < 30  # rank 0 did not wait for rank 1 forever
    finally:
        if launcher.poll() is None:
            launcher.kill()
    out = log.read_text()
    assert launcher.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == ["error: [rank 1] shard train-000001.tar is truncated at byte 4096 (injected)"]
    assert "pix2pix_dist" not in out.split("error: [rank 1]")[1]  # no rank's traceback follows
    assert "[rank0]: Traceback" not in out
    assert "[rank 0] stopped: another training process failed or was killed" in out
    # The launcher's failure summary shows the same line for rank 1 (torch's error file).
    assert "traceback : error: [rank 1] shard train-000001.tar is truncated" in out


def in_tmpfs(size: str, script: str) -> list[str]:
    """A shell command running `script` with a fresh tmpfs of `size` at $MNT, inside a user and
    mount namespace (no root needed, nothing left mounted afterwards)."""
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs user namespaces (unshare -Urm) to mount a small tmpfs")
    return ["unshare", "-Urm", "sh", "-c", f"mkdir -p $MNT && mount -t tmpfs -o size={size} tmpfs $MNT && {script}"]


def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_copy(sample_shards, tmp_path):
    # The tiny model's state.pt is ~24 MB: a 12 MB file system fills up while it is written.
    mnt = tmp_path / "disk"
    script = (f"{sys.executable} train.py {' '.join(TINY)} data.shards={sample_shards} run_dir=$MNT/run "
              f"train.steps=4 ckpt.every=2 log.tracker=none; rc=$?; "
              f"echo checkpoints: $(ls -A $MNT/run/checkpoints); exit $rc")
    proc = subprocess.run(in_tmpfs("12m", script), cwd=REPO, env=clean_env(MNT=str(mnt)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: cannot write checkpoint {mnt}/run/checkpoints/step-00000002: "
                           f"No space left on device")
    assert "free some space" in line
    assert proc.stdout.splitlines()[-1] == "checkpoints:"  # no step-*.tmp, no partial step


def test_colorize_on_a_full_disk_names_the_file_it_could_not_write(tmp_path):
    from PIL import Image
    from skimage import data as skdata
    from test_evaluate import tiny_export

    Image.fromarray(skdata.astronaut()).save(tmp_path / "astronaut.png")  # ~500 KB colorized
    mnt = tmp_path / "disk"
    script = (f"exec {sys.executable} -m pix2pix_dist.colorize {tmp_path / 'astronaut.png'} "
              f"--generator {tiny_export(tmp_path / 'run')} --output $MNT/out")
    proc = subprocess.run(in_tmpfs("64k", script), cwd=REPO, env=clean_env(MNT=str(mnt)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_error_line(proc.stderr) == f"error: {mnt}/out/astronaut.png: No space left on device"


def test_read_only_run_folder_is_refused_before_anything_loads(sample_shards, tmp_path):
    mnt = tmp_path / "ro"
    script = (f"mount -o remount,ro $MNT && exec {sys.executable} train.py {' '.join(TINY)} "
              f"data.shards={sample_shards} run_dir=$MNT log.tracker=none")
    proc = subprocess.run(in_tmpfs("1m", script), cwd=REPO, env=clean_env(MNT=str(mnt)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == (f"error: cannot write to the run folder {mnt}: "
                                           f"Read-only file system")
    assert proc.stdout == ""  # no data, model or checkpoint was loaded first


def test_weights_turning_nan_stop_the_run_and_name_the_last_good_checkpoint(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text('{"state": "finished", "step": 20}\n')  # an earlier run's
    proc = run_python(["tests/ddp_worker.py", "--nan-after", "3", *TINY, f"data.shards={sample_shards}",
                       f"run_dir={run_dir}", "train.steps=20", "ckpt.every=2", "log.tracker=none"],
                      env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    good = run_dir / "checkpoints" / "step-00000002"
    assert line.startswith("error: weights are not finite at step 4 (G.")
    assert line.endswith(f"nothing saved: the last good checkpoint is {good}; lower optim.lr and "
                         f"run again to resume from it")
    assert list_checkpoints(run_dir) == [good]  # step 4 was never written
    export = load_file(run_dir / "generator.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in export.values())
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "running", "step": 0}


def test_fifos_where_the_tools_read_files_are_one_line_errors_never_a_hang(sample_shards, tmp_path,
                                                                           capsys):
    """open() of a FIFO waits for a writer forever: every file read by name is checked first."""
    from pix2pix_dist.evaluate import main as evaluate_main
    from pix2pix_dist.train_loop import main as train_main
    from test_evaluate import tiny_export

    os.mkfifo(tmp_path / "fifo.json")
    shards = tmp_path / "other-tool"  # no manifest: tars found by name and counted
    shards.mkdir()
    for name in ("train-000000.tar", "val-000000.tar"):
        (shards / name).write_bytes((sample_shards / name).read_bytes())
    os.mkfifo(shards / "train-000001.tar")
    export = tiny_export(tmp_path / "run")
    for command, args, named in (
            (train_main, ["--config", str(tmp_path / "fifo.json"), "--dry-run"], "fifo.json"),
            (train_main, [f"data.shards={shards}", "--dry-run"], "train-000001.tar"),
            (evaluate_main, [str(export), "--shards", str(shards), "--split", "train"],
             "train-000001.tar")):
        assert command(args) == 2
        line = one_error_line(capsys.readouterr().err)
        assert named in line and "not a regular file" in line, line


def test_a_ctrl_c_during_shutdown_ends_the_process_without_a_traceback(sample_shards):
    """A second Ctrl-C after the run saved and returned lands in interpreter teardown, e.g. in
    DALI's atexit hook that joins its pipeline threads: injected here by a hook of our own."""
    script = f"""
import atexit, os, signal, sys, time
from pix2pix_dist.train_loop import main
sys.argv = ["train.py", *{TINY!r}, "data.shards={sample_shards}", "--dry-run"]
code = main()
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))
sys.exit(code)
"""
    r = run_python(["-c", script], timeout=120)
    assert r.returncode == -signal.SIGINT, r.stderr[-3000:]
    assert "dry run: nothing was built or trained" in r.stdout  # flushed before the end
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
