"""nvImageCodec's coloured `[ERROR] [jpeg_parser] ...` lines stay off stderr (issue 17 item 8).

A corrupt JPEG in a shard stops a DALI run with our one line; nvImageCodec (inside DALI) also
prints its own error line for it, which data/decoder_log_filter.py drops. The filter is a
process of its own between the training's fd 2 and the real stderr: these tests check that
it drops exactly those lines, however decoder threads interleave them, and that everything
else arrives complete and in order, also from a process that crashes or is killed.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from conftest import REPO, clean_env, run_python
from pix2pix_dist.data.decoder_log_filter import RED, RESET, START, TAG, DecoderLineFilter
from pix2pix_dist.shard_format import index_name, shard_name
from test_data import write_shards

TINY = ["data.load_size=64", "data.crop_size=64", "model.num_downs=6", "model.ngf=16",
        "model.ndf=16", "data.batch_size=2", "data.num_threads=2", "train.mixed_precision=no",
        "log.sample_count=2", "log.tracker=none"]


def decoder_error_pieces(codec: str, message: str) -> list[bytes]:
    """One nvImageCodec error line as its DefaultDebugMessenger writes it: piece by piece."""
    return [RED, TAG, RESET, b"[", codec.encode(), b"] ", message.encode(), b"\n"]


def filtered(chunks: list[bytes]) -> bytes:
    lines = DecoderLineFilter()
    return b"".join(lines.feed(c) for c in chunks) + lines.flush()


def rechunk(data: bytes, rng: random.Random) -> list[bytes]:
    """`data` cut at random places, as reads from a pipe may cut it."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@pytest.mark.slow
def test_a_corrupt_jpeg_stops_dali_training_with_our_one_line_only(tmp_path):
    """The user-facing guarantee: train.py on DALI's CPU pipeline over real tar shards with
    one truncated JPEG prints exactly one stderr line, ours, naming the sample."""
    shards = write_shards(tmp_path / "shards", "train", 12, per_shard=5, corrupt=(7,))
    write_shards(shards, "val", 4, per_shard=4)
    proc = run_python(["train.py", *TINY, f"data.shards={shards}", f"run_dir={tmp_path / 'run'}",
                       "data.backend=dali", "train.steps=6"], timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[ERROR]" not in proc.stderr and "jpeg_parser" not in proc.stderr and "\x1b" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: DALI failed") and "train-000001.tar/train00007 does not decode" in proc.stderr


def test_jpegs_cut_in_their_image_data_give_our_line_with_dalis_reason(tmp_path):
    """JPEGs whose headers parse but whose image data ends early fail in libjpeg-turbo, on
    several decoder threads at once: nvImageCodec's `[ERROR] [libjpeg_turbo_decoder] ...`
    lines (interleaved, seen here) are all dropped, and our line carries DALI's reason."""
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(buf, "JPEG", quality=90)
    jpg = buf.getvalue()[:len(buf.getvalue()) * 7 // 10]
    tar = tmp_path / shard_name("train", 0)
    with tarfile.open(tar, "w") as tf:
        for i in range(16):
            member = tarfile.TarInfo(f"s{i:02d}.jpg")
            member.size = len(jpg)
            tf.addfile(member, io.BytesIO(jpg))
    subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar), str(tmp_path / index_name(tar.name))],
                   check=True, capture_output=True)  # else DALI warns that it indexes the tar itself
    script = textwrap.dedent(f"""
        import sys, torch
        from pix2pix_dist.config import DataConfig
        from pix2pix_dist.data import build_loader
        from pix2pix_dist.data.shards_index import find_shards
        from pix2pix_dist.errors import run_main
        cfg = DataConfig(shards={str(tmp_path)!r}, backend="dali", load_size=64, crop_size=64, num_threads=4)
        sys.exit(run_main(lambda: list(build_loader(find_shards(cfg.shards, "train"), cfg, batch_size=8, rank=0,
                                                    world_size=1, device=torch.device("cpu"), seed=0))))
    """)
    proc = run_python(["-c", script], env={"PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[ERROR]" not in proc.stderr and "\x1b" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: DALI failed") and "Failed to decode sample" in proc.stderr


def test_interleaved_decoder_error_lines_are_all_dropped_and_other_lines_kept():
    """Decoder threads failing together interleave their pieces (seen: two red codes, then
    one line's tag without its colour); whatever the interleaving and however the pipe cuts
    the bytes, none of it passes and the lines between such bursts pass unchanged."""
    rng = random.Random(0)
    for _ in range(300):
        stream, expected = b"", b""
        for burst in range(rng.randint(1, 4)):
            threads = [decoder_error_pieces(rng.choice(["jpeg_parser", "libjpeg_turbo_decoder"]),
                                            f"Invalid marker {burst}.{t}") for t in range(rng.randint(1, 4))]
            while any(threads):
                stream += rng.choice([t for t in threads if t]).pop(0)
            genuine = rng.choice([b"step 10 loss 0.5\n", b"[ERROR] [plain] not theirs: no colour\n",
                                  RED + b"red text of another program" + RESET + b"\n",
                                  RED + TAG + RESET + b"of another program: no [codec]\n",
                                  b"Traceback (most recent call last):\n  File \"x.py\"\n", b"\n"])
            stream, expected = stream + genuine, expected + genuine
        assert filtered(rechunk(stream, rng)) == expected


def test_other_output_passes_byte_for_byte():
    """Random bytes (with colour codes, tags, partial codes and no final newline) pass
    unchanged whatever the chunking: only a complete line of theirs is ever dropped."""
    rng = random.Random(1)
    alphabet = [RED, RESET, TAG, b"[", b"]", b"\n", b"\x1b", b"\x1b[0;3", b"x", b"\xff\x00", b" "]
    for _ in range(500):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        plain = [line.replace(RED, b"").replace(RESET, b"") for line in data.split(b"\n")]
        if any(text.startswith(START) and text != line for text, line in zip(plain[:-1], data.split(b"\n"))):
            continue  # holds a line of theirs (coloured, starting with "[ERROR] [" without colour)
        assert filtered(rechunk(data, rng)) == data


def child(code: str, **kwargs) -> subprocess.Popen:
    """A Python process that installs the filter, then runs `code`; its stderr is a pipe."""
    script = "import os, sys\nfrom pix2pix_dist.data import decoder_log_filter\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=clean_env(PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kwargs)


NOISE = "b''.join([b'\\x1b[0;31m', b'[ERROR] ', b'\\x1b[0m', b'[jpeg_parser] ', b'Invalid marker', b'\\n'])"


def test_a_crashing_process_still_shows_everything_it_wrote_in_order():
    """What makes the filter a process and not a thread: a segfault's faulthandler dump, and
    everything written before it (by Python, by raw writes, by a child process that inherited
    fd 2), reaches the real stderr in order; only the decoder's lines are gone."""
    proc = child(f"""
        import faulthandler, ctypes, subprocess
        faulthandler.enable()
        decoder_log_filter.install()
        print("one", file=sys.stderr, flush=True)
        os.write(2, {NOISE})
        os.write(2, b"two\\n")
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'from a child\\\\n')"])
        os.write(2, {NOISE} + b"three, no newline")
        ctypes.string_at(0)  # segfault
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGSEGV
    lines = err.decode().splitlines()
    assert lines[:4] == ["one", "two", "from a child", "three, no newlineFatal Python error: Segmentation fault"]
    assert "[ERROR]" not in err.decode() and any("most recent call first" in line for line in lines)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_filter_outlives_no_one_and_ignores_stop_signals():
    """After kill -9 of the process, its filter forwards what was written and exits (end of
    input) instead of lingering; a Ctrl-C at the terminal, or the SIGTERM and SIGHUP that
    SLURM or a closed terminal send to every process, do not stop it while the training may
    still print."""
    proc = child(f"""
        import signal, time
        decoder_log_filter.install()
        filter_pid = decoder_log_filter._installed.process.pid
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.killpg(0, signal.SIGINT)  # Ctrl-C at a terminal: the foreground process group
        def ignored(sig):
            with open(f"/proc/{{filter_pid}}/status") as f:
                mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
            return int(mask, 16) >> (sig - 1) & 1
        while not ignored(signal.SIGHUP):  # a fresh interpreter: wait until it is set up
            time.sleep(0.02)
        os.kill(filter_pid, signal.SIGTERM)
        os.kill(filter_pid, signal.SIGHUP)
        os.write(2, {NOISE} + b"last words\\n")
        print(filter_pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, start_new_session=True)
    out, err = proc.communicate(timeout=120)  # returns when the filter, too, has closed the pipe
    assert proc.returncode == -signal.SIGKILL and err == b"last words\n"
    filter_pid = int(out)
    for _ in range(100):  # communicate() saw the pipe close: it is exiting, if not gone
        if not alive(filter_pid):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"filter process {filter_pid} still running after its writer died")


def test_install_is_once_per_stderr_and_the_shell_sees_our_last_line_before_exit():
    """install() twice keeps one filter; after fd 2 is replaced (as pytest's capture does)
    it starts another for the new stderr. At a normal exit the real stderr is put back and
    the filter has forwarded everything before the process ends."""
    proc = child(f"""
        decoder_log_filter.install()
        first = decoder_log_filter._installed.process
        decoder_log_filter.install()
        assert decoder_log_filter._installed.process is first
        os.write(2, {NOISE} + b"before\\n")
        os.dup2(os.dup(decoder_log_filter._installed.stderr), 2)  # someone replaces fd 2
        decoder_log_filter.install()
        assert decoder_log_filter._installed.process is not first
        os.write(2, {NOISE} + b"after\\n")
        print(first.pid, decoder_log_filter._installed.process.pid, flush=True)
    """)
    proc.wait(timeout=120)  # the process has exited: the filters must be done by now
    pids = proc.stdout.read().split()
    assert proc.stderr.read() == b"before\nafter\n" and proc.returncode == 0
    assert not alive(int(pids[1]))
