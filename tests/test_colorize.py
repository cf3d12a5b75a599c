"""colorize: training geometry, full-resolution L, norm mode, output layout, hostile inputs."""

from __future__ import annotations

import os
import shutil
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.color import rgb2lab

from conftest import make_unlistable_folder, run_python
from pix2pix_dist import colorize
from pix2pix_dist.colorize import main as colorize_main
from pix2pix_dist.colorize import PipelineClosed, PixelBudget, find_inputs, output_name
from pix2pix_dist.export import load_export
from pix2pix_dist.imageio import find_image_files, load_image
from pix2pix_dist import inference
from pix2pix_dist.export import InferenceSettings
from pix2pix_dist.data.geometry import resize
from pix2pix_dist.data.lab import lab_to_rgb, uint8_to_lab
from pix2pix_dist.inference import GeometryError, compose, model_shape
from pix2pix_dist.shards.sources import open_source
from test_evaluate import tiny_export


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return tiny_export(tmp_path_factory.mktemp("run") / "run")


def _photo(path: Path, height: int, width: int) -> np.ndarray:
    rgb = np.asarray(Image.fromarray(skdata.astronaut()).resize((width, height)))
    Image.fromarray(rgb).save(path)
    return rgb


def test_geometry_keeps_the_aspect_ratio_and_pads_to_the_network_multiple():
    settings = InferenceSettings(crop_size=64)
    # 333x517: shorter side to 64, long side 517 * 64/333 = 99.4 -> 99, padded to 128
    assert model_shape(333, 517, settings, 64) == (64, 99, 64, 128)
    assert model_shape(517, 333, settings, 32) == (99, 64, 128, 64)
    assert model_shape(333, 517, InferenceSettings(crop_size=64, resize="square"), 64) == (64, 64, 64, 64)
    for height, width in ((1, 2000), (2000, 1), (100, 900), (15, 15)):
        with pytest.raises(GeometryError, match="at least 16 px and an aspect ratio of at most 8:1"):
            model_shape(height, width, settings, 64)


def test_output_has_the_input_size_and_keeps_its_full_resolution_lightness(export, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rgb = _photo(src / "odd.png", 333, 517)
    assert colorize_main([str(src), "--generator", str(export), "--output", str(tmp_path / "out")]) == 0
    out = np.asarray(Image.open(tmp_path / "out" / "odd.png"))
    assert out.shape == (333, 517, 3)
    diff = np.abs(rgb2lab(out)[..., 0] - rgb2lab(rgb)[..., 0])
    # Up to uint8 rounding (about 0.2 L units) and gamut clipping of saturated predictions.
    assert np.median(diff) < 0.3 and np.percentile(diff, 99) < 3.0, (np.median(diff), diff.max())
    assert np.abs(out.astype(int) - rgb).mean() > 1  # and the colour did change


def test_compose_in_row_chunks_equals_one_piece(monkeypatch):
    rgb = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).contiguous()
    ab = torch.rand(2, 17, 23) * 0.6 - 0.3
    whole = compose(rgb, ab)
    monkeypatch.setattr(inference, "CHUNK_PIXELS", 20_000)  # 44 rows at a time
    assert torch.equal(compose(rgb, ab), whole)


def test_full_resolution_colour_is_kornias_lab_to_rgb_within_one_level():
    """compose's table-driven Lab -> RGB against the training code's own (data/lab.py, Kornia)
    on the same L and bilinearly resized ab."""
    rgb = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).contiguous()
    for ab in (torch.rand(2, 37, 53) * 2 - 1, torch.rand(2, 64, 64) * 0.6 - 0.3, torch.zeros(2, 1, 1)):
        ab_full = torch.nn.functional.interpolate(ab[None], size=rgb.shape[-2:], mode="bilinear",
                                                  align_corners=False)
        L, _ = uint8_to_lab(rgb[None])
        expected = lab_to_rgb(L, ab_full)[0].mul(255).round().to(torch.uint8)
        diff = (compose(rgb, ab).int() - expected.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005


def test_network_input_from_strips_is_the_whole_image_resize(monkeypatch):
    """colorize reads a photo a strip at a time; the network still sees validation's resize of
    the whole image, exactly (CPU)."""
    rgb = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).contiguous()  # 300 x 451
    for mode in ("shorter_side", "square"):
        settings = InferenceSettings(crop_size=64, resize=mode)
        whole, _ = uint8_to_lab(resize(rgb, 64, mode)[None])
        monkeypatch.setattr(inference, "CHUNK_PIXELS", 20_000)  # 44 rows at a time
        L, h, w = inference.model_input(rgb, settings, 32)
        assert torch.equal(L[..., :h, :w], whole)
        upscaled, h, w = inference.model_input(rgb[:, :40, :50], InferenceSettings(crop_size=64, resize=mode), 32)
        assert torch.equal(upscaled[..., :h, :w], uint8_to_lab(resize(rgb[:, :40, :50], 64, mode)[None])[0])


class RecordingBudget(PixelBudget):
    """The pipeline's budget, remembering the most pixels and images it let in at once."""
    peaks: list[tuple[int, int]] = []

    def acquire(self, pixels: int) -> None:
        super().acquire(pixels)
        RecordingBudget.peaks.append((self.pixels, self.count))


@pytest.mark.parametrize("mode", ["eval", "batch"])
def test_the_pipeline_writes_what_each_photo_gives_alone_within_its_pixel_budget(
        export, tmp_path, monkeypatch, mode):
    """colorize_files overlaps decoding, the network and colour + encoding of different photos;
    every output is still byte for byte the per-file path's (decode, network input, network,
    colour, encode: the calls the benchmark times), and the decoded pixels in flight stay within
    PIPELINE_PIXELS except for a photo that is alone."""
    src = tmp_path / "in"
    src.mkdir()
    sizes = [(120, 180), (64, 64), (300, 200), (90, 140), (64, 96), (150, 150), (70, 100)]
    for i, (h, w) in enumerate(sizes):
        _photo(src / f"p{i}.jpg", h, w)
    Image.fromarray(np.asarray(Image.open(src / "p0.jpg").convert("L"))).save(src / "gray.png")
    Image.open(src / "p1.jpg").convert("P", palette=Image.Palette.ADAPTIVE).save(src / "pal.png")
    limit = 3 * 150 * 150  # p2 (60,000 px) shares the pipeline with little; most others fit 3-4 at once
    monkeypatch.setattr(colorize, "PIPELINE_PIXELS", limit)
    monkeypatch.setattr(colorize, "PixelBudget", RecordingBudget)
    RecordingBudget.peaks = []
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    assert colorize_main([str(src), "--generator", str(export), "--output", str(out),
                          "--norm-mode", mode, "--no-progress"]) == 0
    assert all(pixels <= limit or count == 1 for pixels, count in RecordingBudget.peaks)
    assert max(count for _, count in RecordingBudget.peaks) > 1  # it did overlap photos
    assert torch.get_num_threads() == threads  # the network's share of the cores is given back
    exported = load_export(export, torch.device("cpu"))
    for path in sorted(src.iterdir()):
        image = load_image(path)
        L, h, w = colorize.network_input(image, exported, torch.device("cpu"))
        ab = inference.predict_ab(exported.generator, L, mode, [inference.image_seed(path.name)])
        alone = colorize.encoded(colorize.colorized(image, ab[0, :, :h, :w]), "png", 95)
        assert (out / (path.stem + ".png")).read_bytes() == alone, path.name


def test_the_pixel_budget_admits_what_fits_and_a_larger_image_alone():
    budget = PixelBudget(limit=100)
    budget.acquire(60)
    budget.acquire(40)  # 100: fits exactly

    def acquire_in_thread(pixels: int) -> tuple[threading.Thread, list[BaseException]]:
        errors: list[BaseException] = []

        def body() -> None:
            try:
                budget.acquire(pixels)
            except BaseException as exc:
                errors.append(exc)
        thread = threading.Thread(target=body)
        thread.start()
        deadline = time.monotonic() + 30
        while budget.waiting == 0 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # until it waits (a guard, not a timing assumption)
        assert budget.waiting == 1
        return thread, errors

    thread, errors = acquire_in_thread(500)  # over the limit: waits until nothing is in flight
    budget.release(60)
    assert budget.waiting == 1 and thread.is_alive()
    budget.release(40)
    thread.join(30)
    assert not thread.is_alive() and not errors and (budget.pixels, budget.count) == (500, 1)
    thread, errors = acquire_in_thread(1)  # nothing fits beside a photo over the limit
    budget.close()  # colorize stopping: the loader's wait ends with PipelineClosed
    thread.join(30)
    assert [type(e) for e in errors] == [PipelineClosed]
    with pytest.raises(PipelineClosed):
        budget.acquire(1)
    assert PixelBudget(limit=10, min_count=3).admits(1000)  # a batch of 3 can always fill


def test_importing_colorize_leaves_out_torchvision_and_torch_compile():
    """torchvision imports torch._dynamo: about 180 MB of memory colorize never uses."""
    proc = run_python(["-c", "import sys, pix2pix_dist.colorize; print(sorted(m for m in "
                       "('torchvision', 'torch._dynamo', 'webdataset') if m in sys.modules))"])
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_recorded_norm_mode_is_used_and_the_modes_differ(tmp_path, capsys):
    export = tiny_export(tmp_path / "run", **{"eval.norm_mode": "batch"})
    _photo(tmp_path / "p.png", 80, 120)
    outputs = {}
    for mode in (None, "batch", "eval"):
        args = [str(tmp_path / "p.png"), "--generator", str(export), "--output", str(tmp_path / str(mode))]
        assert colorize_main(args + (["--norm-mode", mode] if mode else [])) == 0
        outputs[mode] = np.asarray(Image.open(tmp_path / str(mode) / "p.png"))
    assert np.array_equal(outputs[None], outputs["batch"])
    assert not np.array_equal(outputs["batch"], outputs["eval"])


def test_folder_structure_is_kept_and_no_output_overwrites_another(export, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "trip" / "day 1").mkdir(parents=True)
    (src / "other").mkdir()
    for rel in ("a.jpg", "a.png", "trip/day 1/a.jpg", "other/a.jpg"):
        _photo(src / rel, 40, 60)
    out = tmp_path / "out"
    assert colorize_main([str(src), str(src / "a.jpg"), "--generator", str(export), "--output",
                          str(out), "--format", "jpeg", "--no-progress"]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a-2.jpg", "a-3.jpg", "a.jpg", "other/a.jpg", "trip/day_1/a.jpg"]
    assert all((out / w).read_bytes()[:3] == b"\xff\xd8\xff" for w in written)  # JPEG
    assert "colorized 5 image(s)" in capsys.readouterr().out


def test_an_input_inside_the_output_folder_is_never_overwritten(export, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.png", 40, 60)
    original = (photos / "a.png").read_bytes()
    assert colorize_main([str(photos), "--generator", str(export), "--output", str(photos),
                          "--no-progress"]) == 0
    assert (photos / "a.png").read_bytes() == original  # the photo itself is kept
    assert sorted(p.name for p in photos.iterdir()) == ["a-2.png", "a.png"]


def test_a_symbolic_link_in_the_output_folder_is_not_followed(export, tmp_path, capsys):
    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    (src / "sub" / "deep").mkdir(parents=True)
    _photo(src / "sub" / "deep" / "b.jpg", 40, 60)
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    assert colorize_main([str(src), "--generator", str(export), "--output", str(out)]) == 2
    assert "leads outside --output" in capsys.readouterr().err
    assert not list(elsewhere.iterdir())  # not even an empty folder


def test_names_from_data_cannot_leave_the_output_folder():
    used: set[str] = set()
    for rel in ("../../etc/passwd.png", "..", ".hidden/.x.png", "a/../../b.png"):
        name = output_name(Path(rel), ".png", used)
        assert not name.is_absolute() and ".." not in name.parts, name
        assert not any(part.startswith(".") for part in name.parts), name
    assert output_name(Path("A.png"), ".png", {"a.png"}) == Path("A-2.png")  # case-insensitive


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose header claims width x height (PIL checks the size when opening)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00\x00")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_hostile_inputs_are_skipped_and_counted_without_blocking(export, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _photo(src / "good.jpg", 64, 96)
    _photo(src / "big.png", 300, 300)  # over --max-pixels below
    os.mkfifo(src / "pipe.jpg")  # opening it for reading would block forever
    _bomb_png(src / "bomb.png", 30000, 30000)  # PIL's decompression-bomb error, 900 MP
    (src / "bro\nken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(np.zeros((2, 400, 3), np.uint8)).save(src / "strip.png")
    gradient = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(gradient).save(src / "deep.png")  # 16-bit grayscale (mode I;16)
    assert Image.open(src / "deep.png").mode.startswith("I")
    out = tmp_path / "out"
    proc = run_python(["-m", "pix2pix_dist.colorize", str(src), "--generator", str(export),
                       "--output", str(out), "--max-pixels", "50000"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "colorized 2 image(s)" in proc.stdout
    assert "skipped 5 (1 not_a_file, 2 too_large, 1 too_thin, 1 unreadable)" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert "bro\\nken.jpg: " in proc.stderr  # a newline in a name does not split the line
    deep = np.asarray(Image.open(out / "deep.png").convert("L"), dtype=float)
    expected = gradient / 257.0
    assert abs(deep.mean() - expected.mean()) < 3, (deep.mean(), expected.mean())  # not near white


MEASURE_PEAK = """
import resource, sys
import pix2pix_dist.colorize as c
small, big, *args = sys.argv[1:]
assert c.main([small, *args]) == 0  # warm-up: lazy imports and first-call allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = c.main([big, *args])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("peak-growth-kib", after - before)
sys.exit(code)
"""


@pytest.mark.slow
def test_a_large_photo_is_colorized_without_full_size_float_copies(export, tmp_path):
    height, width = 2400, 3600  # 8.6 MP; the old path held ~190 bytes/pixel (4.5 GB at 24 MP)
    Image.fromarray(skdata.astronaut()).resize((width, height)).save(tmp_path / "big.jpg")
    _photo(tmp_path / "small.jpg", 300, 400)
    proc = run_python(["-c", MEASURE_PEAK, str(tmp_path / "small.jpg"), str(tmp_path / "big.jpg"),
                       "--generator", str(export),
                       "--output", str(tmp_path / "out"), "--format", "jpeg"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth = int(proc.stdout.split("peak-growth-kib")[1].split()[0]) * 1024
    assert Image.open(tmp_path / "out" / "big.jpg").size == (width, height)
    # The decoded image, coloured in place (4 bytes/pixel in PIL), plus a strip's temporaries.
    assert growth < 5 * height * width + inference.CHUNK_PIXELS * 48, growth / (height * width)


PEAK_OF_A_PROCESS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                     "print('peak-kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


@pytest.mark.slow
def test_a_100_mp_palette_png_and_a_56_mp_photo_stay_under_1_5_gb(export, tmp_path):
    """The README's bound: peak RSS of the whole colorize process, imports included."""
    index = np.add.outer(np.arange(9990) // 37, np.arange(9990) // 53).astype(np.uint8)
    palette = Image.fromarray(index, "P")
    palette.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tobytes())
    palette.save(tmp_path / "palette.png")  # under 1 MB on disk, 100 MP decoded
    del index, palette
    Image.fromarray(skdata.astronaut()).resize((8640, 6480)).save(tmp_path / "photo.jpg", quality=90)
    for name in ("palette.png", "photo.jpg"):  # the palette is over the default --max-pixels
        proc = run_python(["-c", PEAK_OF_A_PROCESS, sys.executable, "-m", "pix2pix_dist.colorize",
                           str(tmp_path / name), "--generator", str(export), "--output",
                           str(tmp_path / "out"), "--format", "jpeg", "--max-pixels", "100000000"],
                          timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak = int(proc.stdout.split("peak-kib")[1].split()[0]) * 1024
        assert peak < 1.5e9, (name, peak / 1e9)
    with pytest.warns(Image.DecompressionBombWarning), Image.open(tmp_path / "out" / "palette.jpg") as out:
        assert out.size == (9990, 9990)
    # With the default bound (sized for unet_256's larger base), the palette is refused from its
    # header, one counted line, before anything is decoded.
    proc = run_python(["-m", "pix2pix_dist.colorize", str(tmp_path / "palette.png"), "--generator",
                       str(export), "--output", str(tmp_path / "default")], timeout=120)
    assert "skipped 1 (1 too_large)" in proc.stdout, proc.stdout + proc.stderr
    assert "100 MP is over --max-pixels 70 MP" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "default" / "palette.png").exists()


@pytest.mark.gpu
def test_gpu_batches_match_cpu_one_by_one(export, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        _photo(src / f"p{i}.png", 90 + i % 2, 140)  # two network input sizes, interleaved
    for device, batch in (("cpu", "1"), ("cuda", "4")):
        assert colorize_main([str(src), "--generator", str(export), "--output",
                              str(tmp_path / device), "--device", device, "--batch-size", batch]) == 0
    for i in range(5):
        cpu, gpu = (np.asarray(Image.open(tmp_path / d / f"p{i}.png"), dtype=int) for d in ("cpu", "cuda"))
        # TF32 convolutions and cuDNN differ from CPU by a few uint8 levels at most
        assert np.abs(cpu - gpu).max() <= 3 and np.abs(cpu - gpu).mean() < 0.5


@pytest.mark.parametrize("args, message", [
    (["--max-pixels", "0"], "--max-pixels and --batch-size must be at least 1"),
    (["--format", "gif"], "gif"),
    (["--device", "cuda"], "no CUDA device is available"),
    (["--generator", "/nonexistent.safetensors"], "no generator export at /nonexistent.safetensors"),
])
def test_bad_options_are_one_line_errors(export, tmp_path, capsys, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _photo(tmp_path / "p.png", 40, 40)
    assert colorize_main([str(tmp_path / "p.png"), "--generator", str(export), *args,
                          "--output", str(tmp_path / "out")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_a_run_folder_stands_for_its_generator_export(export, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(export, run / "generator.safetensors")
    _photo(tmp_path / "p.png", 96, 128)
    for name, generator in (("by_file", export), ("by_folder", run)):
        assert colorize_main([str(tmp_path / "p.png"), "--generator", str(generator),
                              "--output", str(tmp_path / name)]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "by_file" / "p.png")),
                          np.asarray(Image.open(tmp_path / "by_folder" / "p.png")))
    assert colorize_main([str(tmp_path / "p.png"), "--generator", str(tmp_path),
                          "--output", str(tmp_path / "none")]) == 2  # a folder without an export


def test_folders_are_searched_as_the_shard_writer_searches_its_sources(tmp_path):
    src, outside = tmp_path / "in", tmp_path / "outside"
    for rel in ("a.jpg", ".hidden.jpg", "._a.jpg", ".git/b.jpg", "__MACOSX/c.jpg", "sub/.d.png",
                "sub/d.PNG", "sub/notes.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x")
    outside.mkdir()
    (outside / "e.jpg").write_bytes(b"x")
    (src / "linked").symlink_to(outside)  # followed, like a dataset symlinked in
    (src / "sub" / "loop").symlink_to(src)  # a cycle: each folder is read once
    found = [str(relative) for _, relative in find_inputs([src])[0]]
    assert found == ["a.jpg", "linked/e.jpg", "sub/d.PNG"]
    assert found == [c.relpath for c in open_source(src).candidates]
    assert find_inputs([src / ".hidden.jpg"]) == ([(src / ".hidden.jpg", Path(".hidden.jpg"))], [])


def test_a_folder_linked_inside_the_input_keeps_its_own_name(tmp_path):
    """`latest -> 2024` inside the input: the images are found once, under 2024/ (the real
    folder), not under the link's name, whatever order the folders are listed in."""
    src = tmp_path / "in"
    for i in range(8):  # each pair listed in the file system's order, link or folder first
        (src / f"real{i}").mkdir(parents=True)
        (src / f"real{i}" / "p.jpg").write_bytes(b"x")
        (src / f"link{i}").symlink_to(src / f"real{i}")
        (src / f"real{i}" / "up").symlink_to(src)  # a link back: a cycle
    found = [str(relative) for _, relative in find_inputs([src])[0]]
    assert found == [f"real{i}/p.jpg" for i in range(8)]
    assert found == [c.relpath for c in open_source(src).candidates]  # the shard writer agrees


def test_two_links_to_one_outside_folder_give_the_first_name_in_order(tmp_path):
    src, outside = tmp_path / "in", tmp_path / "outside"
    outside.mkdir()
    (outside / "p.jpg").write_bytes(b"x")
    src.mkdir()
    for name in ("zeta", "beta", "alpha", "mid"):  # created out of order
        (src / name).symlink_to(outside)
    assert [rel for rel, _ in find_image_files(src)[0]] == ["alpha/p.jpg"]


def test_an_unlistable_folder_is_a_counted_skip(export, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.png", 40, 60)
    make_unlistable_folder(photos)
    assert colorize_main([str(photos), "--generator", str(export), "--output",
                          str(tmp_path / "out"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "folder cannot be listed" in err and len(err.strip().splitlines()) == 1
    assert "colorized 1 image(s)" in out and "skipped 1 (1 unreadable)" in out


def test_an_output_folder_inside_the_input_is_not_searched(export, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.png", 40, 60)
    args = [str(photos), "--generator", str(export), "--output", str(photos / "colorized"),
            "--no-progress"]
    assert colorize_main(args) == 0
    first = (photos / "colorized" / "a.png").read_bytes()
    assert colorize_main(args) == 0  # the rerun does not colorize its own results again
    assert sorted(str(p.relative_to(photos)) for p in photos.rglob("*")) == [
        "a.png", "colorized", "colorized/a.png"]
    assert (photos / "colorized" / "a.png").read_bytes() == first
