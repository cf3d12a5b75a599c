"""Shard writer: real photos in, shards read back by webdataset and DALI, bad inputs, resume."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_unlistable_folder
from pix2pix_dist.shards import ShardError, ShardOptions, build_shards, verify_shards
from pix2pix_dist.shards.build import val_count
from pix2pix_dist.shard_format import FORMAT, split_name
from pix2pix_dist.shards.images import jpeg_sof
from pix2pix_dist.shards.options import parse_max_bytes, parse_shard_size
from pix2pix_dist.shards.sources import Source, Candidate, assign_keys, sample_dir

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
WDS2IDX = Path(sys.executable).parent / "wds2idx"
COLOUR_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "ihc.png", "retina.jpg", "color.png"]


def photo(name: str, short: int | None = 160) -> Image.Image:
    """A real colour photo from scikit-image, downscaled so tests stay fast."""
    im = Image.open(sample_dir() / name).convert("RGB")
    if short is not None:
        s = short / min(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BILINEAR)
    return im


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def opts(source, out: Path, **kw) -> ShardOptions:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 3)
    return ShardOptions(source=source, output=out, **kw)


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def read_samples(out: Path, split: str) -> dict[str, tuple[bytes, dict]]:
    samples = {}
    for tar in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, ext = split_name(m.name)
                samples.setdefault(key, [None, None])[0 if ext == "jpg" else 1] = tf.extractfile(m).read()
    return {k: (jpg, json.loads(meta)) for k, (jpg, meta) in samples.items()}


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sample")
    return out, build_shards(opts("sample", out, workers=2))


# -- the bundled sample photos, read back by webdataset and by DALI -------------------------------


def test_sample_manifest_layout_and_filters(sample_shards):
    out, m = sample_shards
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["format"] == FORMAT and m["args"]["source"] == "sample"
    train, val = m["splits"]["train"], m["splits"]["val"]
    # skimage ships 11 colour photos (RGBA horse is black on transparent: gray once on white).
    assert train["samples"] + val["samples"] == 11
    assert val["samples"] == val_count(11, 0.2) == 2
    assert [s["samples"] for s in train["shards"]] == [3, 3, 3]
    assert [s["tar"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for s in train["shards"] + val["shards"]:
        assert (out / s["tar"]).stat().st_size == s["bytes"] and (out / s["index"]).is_file()
    assert m["skipped"] == {"grayscale": 15, "too_small": 2, "unsupported": 1}
    assert "camera.png" in " ".join(os.listdir(sample_dir()))  # a gray photo skimage ships
    assert all(len(v) <= 5 for v in m["skipped_examples"].values())
    assert set(m["skipped_examples"]["too_small"]) == {"no_time_for_that_tiny.gif", "multipage.tif"}
    assert not list(out.glob("*.tmp"))
    assert verify_shards(out) == []


def test_webdataset_reads_shards(sample_shards):
    import webdataset as wds

    out, m = sample_shards
    urls = [str(out / s["tar"]) for s in m["splits"]["train"]["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        im = Image.open(io.BytesIO(sample["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == (meta["width"], meta["height"])
        assert meta["key"] == sample["__key__"]
        seen[sample["__key__"]] = meta["source"]
    assert len(seen) == m["splits"]["train"]["samples"]
    assert all("." not in k and "/" not in k and " " not in k for k in seen)
    # The original bytes of the sample JPEGs were kept (nothing needed changing).
    samples = read_samples(out, "train") | read_samples(out, "val")
    assert samples["rocket"][0] == (sample_dir() / "rocket.jpg").read_bytes()
    assert samples["rocket"][1]["reencoded"] is False
    assert samples["astronaut"][1]["reencoded"] is True  # PNG -> JPEG


def test_dali_reads_shards_with_index(sample_shards):
    from nvidia.dali import fn, pipeline_def, types

    out, m = sample_shards
    shards = m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]
    total = sum(s["samples"] for s in shards)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        jpg, meta = fn.readers.webdataset(
            paths=[str(out / s["tar"]) for s in shards], index_paths=[str(out / s["index"]) for s in shards],
            ext=["jpg", "json"], missing_component_behavior="error", name="reader", pad_last_batch=True)
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), meta

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == total
    seen = {}
    for _ in range(-(-total // 4)):
        images, metas = p.run()
        for i in range(len(images)):
            meta = json.loads(bytes(np.array(metas.at(i))))
            img = np.array(images.at(i))
            assert img.shape == (meta["height"], meta["width"], 3)
            seen[meta["key"]] = img.shape
    assert len(seen) == total


def test_index_equals_wds2idx(sample_shards, tmp_path):
    out, m = sample_shards
    for s in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        ref = tmp_path / s["index"]
        subprocess.run([str(WDS2IDX), str(out / s["tar"]), str(ref)], check=True, capture_output=True)
        assert (out / s["index"]).read_bytes() == ref.read_bytes()


def test_same_arguments_give_identical_shards(sample_shards, tmp_path):
    out, m = sample_shards  # built with workers=2
    again = build_shards(opts("sample", tmp_path / "again", workers=1))
    assert shard_files(tmp_path / "again") == shard_files(out)
    assert again["splits"] == m["splits"]
    with tarfile.open(out / "train-000000.tar") as tf:
        assert {(t.mtime, t.uid, t.gid, t.uname, t.gname, t.mode) for t in tf} == {(0, 0, 0, "", "", 0o644)}
    other = build_shards(opts("sample", tmp_path / "seed1", seed=1))
    assert shard_files(tmp_path / "seed1") != shard_files(out)
    assert other["splits"]["train"]["samples"] == m["splits"]["train"]["samples"]


def test_limit_is_exact_and_seeded(tmp_path):
    m = build_shards(opts("sample", tmp_path / "a", limit=5, shard_size="1MB"))
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (4, 1)
    keys_a = set(read_samples(tmp_path / "a", "train")) | set(read_samples(tmp_path / "a", "val"))
    build_shards(opts("sample", tmp_path / "b", limit=5, seed=3))
    keys_b = set(read_samples(tmp_path / "b", "train")) | set(read_samples(tmp_path / "b", "val"))
    assert len(keys_a) == len(keys_b) == 5 and keys_a != keys_b
    # shard size in MB: no tar above the limit unless a single sample is larger
    for s in m["splits"]["train"]["shards"]:
        assert s["bytes"] <= 1_000_000 or s["samples"] == 1


def test_val_count_rule():
    assert val_count(10_000, 0.2) == 2_000  # the tutorial: 8,000 train + 2,000 val
    assert [val_count(n, 0.2) for n in range(6)] == [0, 0, 1, 1, 1, 1]
    assert val_count(5, 0.0) == 0 and val_count(3, 0.99) == 2
    for f in (0.05, 0.2, 0.5, 0.9):
        steps = [val_count(n + 1, f) - val_count(n, f) for n in range(500)]
        assert set(steps) <= {0, 1}


def test_parse_shard_size():
    assert parse_shard_size("256MB").max_bytes == 256_000_000
    assert parse_shard_size("1GiB").max_bytes == 2**30
    assert parse_shard_size("1000").max_samples == 1000
    assert parse_shard_size(7).max_samples == 7
    for bad in ("abc", "0", "1.5", "12XB", -3):
        with pytest.raises(ShardError):
            parse_shard_size(bad)
    assert parse_max_bytes("64MB") == 64_000_000 and parse_max_bytes(5000) == 5000
    for bad in ("0", "x", "1XB", True):
        with pytest.raises(ShardError, match="--max-bytes"):
            parse_max_bytes(bad)


def test_keys_are_sanitized_and_unique():
    src = Source("folder", Path("/x"), "x", [Candidate(p, 1) for p in [
        "root/a.jpg", "root/a.png", "root/sub dir/img.v2 final.JPG", "root/tab\there.jpg", "root/x\\y.jpg"]])
    other = Source("folder", Path("/y"), "y", [Candidate("a.jpg", 1), Candidate("b.jpg", 1)])
    keys = assign_keys([src, other])
    flat = keys[0] + keys[1]
    assert len(set(flat)) == len(flat)
    for k in flat:
        assert k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k)
    assert keys[0][2] == "sub_dir_img_v2_final" and keys[0][3] == "tab_here" and keys[1][1] == "b"
    assert keys[0][0].startswith("a-") and keys[1][0].startswith("a-")  # 3-way collision -> hashed


# -- COCO-style zip ------------------------------------------------------------------------------


def test_coco_zip_source(tmp_path):
    zpath = tmp_path / "train2017.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i, name in enumerate(COLOUR_PHOTOS):
            zf.writestr(f"train2017/{139 + i:012d}.jpg", jpeg_bytes(photo(name)))
        zf.writestr("train2017/", b"")
        zf.writestr("__MACOSX/train2017/._000000000139.jpg", b"junk")
        zf.writestr("train2017/000000999999.jpg", b"")  # zero bytes
    out = tmp_path / "out"
    m = build_shards(opts(str(zpath), out, workers=2))
    assert m["dataset"] == "train2017"
    samples = read_samples(out, "train") | read_samples(out, "val")
    assert sorted(samples) == [f"{139 + i:012d}" for i in range(len(COLOUR_PHOTOS))]
    assert samples["000000000139"][1]["source"] == "train2017/000000000139.jpg"
    assert all(not meta["reencoded"] for _, meta in samples.values())  # baseline RGB JPEGs kept
    assert m["skipped"] == {"empty": 1}
    assert m["splits"]["val"]["samples"] == 2 and verify_shards(out) == []


def test_separate_val_source(tmp_path):
    for folder, names in (("tr", COLOUR_PHOTOS[:5]), ("va", COLOUR_PHOTOS[5:])):
        (tmp_path / folder).mkdir()
        for n in names:
            photo(n).save(tmp_path / folder / (Path(n).stem + ".png"))
    m = build_shards(opts(tmp_path / "tr", tmp_path / "out", val_source=tmp_path / "va"))
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (5, 3)
    assert set(read_samples(tmp_path / "out", "val")) == {Path(n).stem for n in COLOUR_PHOTOS[5:]}


def test_val_source_ignores_val_fraction_and_shares_limit(tmp_path):
    for folder, names in (("tr", COLOUR_PHOTOS[:5]), ("va", COLOUR_PHOTOS[5:])):
        (tmp_path / folder).mkdir()
        for n in names:
            photo(n).save(tmp_path / folder / (Path(n).stem + ".png"))
    # --val-fraction 0 used to cap the val source at 0 samples: the val source was dropped silently.
    m = build_shards(opts(tmp_path / "tr", tmp_path / "a", val_source=tmp_path / "va", val_fraction=0.0, limit=4))
    assert (m["splits"]["train"]["samples"], m["splits"]["val"]["samples"]) == (2, 2)  # 5:3 files, rounded
    build_shards(opts(tmp_path / "tr", tmp_path / "b", val_source=tmp_path / "va", val_fraction=0.5, limit=4))
    assert shard_files(tmp_path / "a") == shard_files(tmp_path / "b")
    with pytest.raises(ShardError, match="same as --source"):
        build_shards(opts(tmp_path / "tr", tmp_path / "c", val_source=tmp_path / "tr" / ".." / "tr"))


def test_limit_above_usable_images_is_noted(tmp_path):
    r = run_cli("--source", "sample", "--output", str(tmp_path / "o"), "--limit", "100", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "  note: --limit 100 asked, only 11 usable images" in r.stdout.splitlines()
    r = run_cli("--source", "sample", "--output", str(tmp_path / "o2"), "--limit", "5", "--no-progress")
    assert r.returncode == 0 and "note:" not in r.stdout


# -- bad and unusual inputs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def weird(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("weird")
    good = photo("coffee.png")
    (d / "good.jpg").write_bytes(jpeg_bytes(good))
    (d / "corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    full = jpeg_bytes(photo("astronaut.png", 256))
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.png").write_text("these are my notes, not a picture\n")
    photo("chelsea.png").convert("L").save(d / "gray_L.png")
    (d / "gray_rgb.JPG").write_bytes(jpeg_bytes(photo("chelsea.png").convert("L").convert("RGB")))
    photo("rocket.jpg").convert("CMYK").save(d / "cmyk.jpg", "JPEG", quality=90)
    rgba = photo("astronaut.png").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(d / "rgba.png")
    photo("coffee.png").convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    rot = photo("motorcycle_left.png")  # landscape, stored with "rotate 90 CW" EXIF
    exif = Image.Exif()
    exif[0x0112] = 6
    (d / "rotated.jpg").write_bytes(jpeg_bytes(rot, exif=exif.tobytes()))
    photo("retina.jpg", 32).save(d / "tiny.png")
    (d / "nested" / "my photos").mkdir(parents=True)
    photo("ihc.png").save(d / "nested" / "my photos" / "img.v2 final.WEBP", "WEBP")
    (d / "nested" / "readme.txt").write_text("ignored: not an image extension")
    (d / "._good.jpg").write_bytes(b"AppleDouble junk")  # hidden: ignored
    (d / "dangling.jpg").symlink_to(d / "deleted-long-ago.jpg")
    (d / "cut_header.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00")  # ends inside the APP0 marker
    (d / "progressive.jpg").write_bytes(jpeg_bytes(photo("rocket.jpg"), progressive=True))
    return d


@pytest.fixture(scope="module")
def weird_shards(weird, tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("weird_out")
    m = build_shards(opts(weird, out, val_fraction=0.0, workers=2))
    return out, m, read_samples(out, "train")


def test_bad_inputs_are_skipped_by_reason(weird_shards):
    _, m, samples = weird_shards
    assert m["skipped"] == {"corrupt": 1, "truncated": 2, "empty": 1, "not_an_image": 1, "grayscale": 2,
                            "too_small": 1, "unreadable": 1}
    assert sorted(m["skipped_examples"]["grayscale"]) == ["gray_L.png", "gray_rgb.JPG"]  # shuffled order
    assert sorted(m["skipped_examples"]["truncated"]) == ["cut_header.jpg", "truncated.jpg"]
    assert m["skipped_examples"]["unreadable"] == ["dangling.jpg"]  # counted, not silently dropped
    assert m["skipped_examples"]["not_an_image"] == ["notes.png"]
    assert sorted(samples) == ["cmyk", "good", "nested_my_photos_img_v2_final", "palette", "progressive",
                               "rgba", "rotated"]
    assert m["splits"]["val"]["samples"] == 0 and m["splits"]["val"]["shards"] == []


def test_conversions(weird, weird_shards):
    _, _, samples = weird_shards
    for key, (jpg, meta) in samples.items():
        im = Image.open(io.BytesIO(jpg))
        assert im.format == "JPEG" and im.mode == "RGB" and len(im.getbands()) == 3, key
        assert im.size == (meta["width"], meta["height"])
        assert not im.getexif().get(0x0112), key  # no orientation left for a reader to re-apply
    assert samples["good"][0] == (weird / "good.jpg").read_bytes()
    # Progressive JPEGs are re-encoded to baseline (SOF0) for the A100/H100 hardware decoder.
    assert jpeg_sof((weird / "progressive.jpg").read_bytes())[0] == 0xC2
    prog_jpg, prog_meta = samples["progressive"]
    assert jpeg_sof(prog_jpg)[0] == 0xC0 and prog_meta["changes"] == ["to_baseline"] and prog_meta["reencoded"]
    assert jpeg_sof(samples["good"][0])[0] == 0xC0
    assert samples["cmyk"][1]["mode"] == "CMYK" and samples["cmyk"][1]["reencoded"]
    assert samples["rgba"][1]["changes"] == ["alpha_on_white", "to_jpeg"]
    assert samples["palette"][1]["mode"] == "P"
    rot = samples["rotated"][1]
    assert rot["exif_orientation"] == 6 and rot["orig_width"] > rot["orig_height"]
    assert (rot["width"], rot["height"]) == (rot["orig_height"], rot["orig_width"])
    assert samples["nested_my_photos_img_v2_final"][1]["source"] == "nested/my photos/img.v2 final.WEBP"
    # transparency composited on white: the fully transparent top rows (alpha gradient) are white
    rgba = np.asarray(Image.open(io.BytesIO(samples["rgba"][0])))
    assert rgba[:2].mean() > 240 and rgba[-2:].mean() < 240


def test_resize_downscales_only(weird, tmp_path):
    out = tmp_path / "r"
    build_shards(opts(weird, out, resize=100, val_fraction=0.0))
    samples = read_samples(out, "train")
    for key, (jpg, meta) in samples.items():
        assert min(meta["width"], meta["height"]) == 100, key
        assert Image.open(io.BytesIO(jpg)).size == (meta["width"], meta["height"])
        assert "resize" in meta["changes"]
    build_shards(opts(weird, tmp_path / "big", resize=5000, val_fraction=0.0))
    assert read_samples(tmp_path / "big", "train")["good"][1]["reencoded"] is False


def test_files_above_max_bytes_are_skipped_unread(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    small = jpeg_bytes(photo("coffee.png"))
    (src / "small.jpg").write_bytes(small)
    (src / "big.jpg").write_bytes(jpeg_bytes(photo("chelsea.png", 600)))
    assert len(small) < 30_000 < (src / "big.jpg").stat().st_size
    m = build_shards(opts(src, tmp_path / "o", max_bytes="30kB", val_fraction=0.0))
    assert m["skipped"] == {"too_large": 1} and m["skipped_examples"]["too_large"] == ["big.jpg"]
    assert m["args"]["max_bytes"] == "30kB"
    # A zip bomb: a member listed as 70 MB that deflates from a few KB. Its zeros would be
    # "not_an_image" if they were inflated; the default --max-bytes 64MB skips it from the listing.
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("photo.jpg", small)
        zf.writestr("bomb.png", bytes(70_000_000))
    assert zpath.stat().st_size < 200_000
    m = build_shards(opts(zpath, tmp_path / "z", val_fraction=0.0))
    assert m["skipped"] == {"too_large": 1} and m["skipped_examples"]["too_large"] == ["bomb.png"]
    assert m["splits"]["train"]["samples"] == 1


# -- errors --------------------------------------------------------------------------------------


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pix2pix_dist.shards", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60, **kw)


@pytest.mark.parametrize("source, name", [
    ("coco.v2", "coco.v2"), ("/data/coco/train2017.zip", "train2017"), ("/data/X.ZIP", "X"),
    ("/data/coco/train2017/", "train2017"), ("/data/a.b/c", "c"), ("sample", "sample")])
def test_make_shards_names_the_output_after_the_source(source, name):
    """`make shards` writes to shards/<folder or zip name>: only a .zip suffix is stripped."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    cmd = subprocess.run(["make", "-n", "shards", f"SOURCE={source}"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert f" --output shards/{name} " in cmd


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--source", str(tmp_path / "missing"), "--output", str(tmp_path / "o1")], "source not found"),
        (["--source", str(tmp_path / "empty"), "--output", str(tmp_path / "o2")], "no images"),
        (["--source", "sample", "--output", str(tmp_path / "afile" / "out")], "not writable"),
        (["--source", "sample", "--output", str(tmp_path / "o3"), "--val-fraction", "1.5"], "--val-fraction"),
        (["--verify"], "--output"),
        (["--verify", "--output", str(tmp_path / "missing")], "is not a folder of shards"),
        (["--source", "sample", "--val-source", str(sample_dir()), "--output", str(tmp_path / "o5")],
         "--val-source is the same as --source"),
        (["--source", "sample", "--output", str(tmp_path / "o6"), "--max-bytes", "lots"], "--max-bytes"),
    ]
    for args, needle in cases:
        r = run_cli(*args, "--no-progress")
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not list(tmp_path.rglob("*.tar")) and not (tmp_path / "o1").exists()
    with pytest.raises(ShardError, match="source not found"):
        build_shards(opts(tmp_path / "missing", tmp_path / "o4"))


def test_verify_catches_flipped_byte(sample_shards, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sample_shards[0], out)
    tar = out / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[5000] ^= 0xFF  # inside the first JPEG's data
    tar.write_bytes(bytes(data))
    problems = verify_shards(out)
    assert problems and all("train-000001" in p for p in problems)
    assert any("sha256" in p for p in problems)
    r = run_cli("--verify", "--output", str(out))
    assert r.returncode == 1 and "train-000001.tar" in r.stderr
    assert run_cli("--verify", "--output", str(sample_shards[0])).returncode == 0
    (out / "val-000000.idx").write_text("v1.2 0\n")
    assert any("val-000000.idx" in p for p in verify_shards(out))


@pytest.mark.parametrize("manifest", [
    [], {"format": FORMAT, "splits": 5}, {"splits": {"train": [], "val": None}},
    {"splits": {"train": {"samples": 1, "shards": [{"tar": "train-000000.tar"}]}, "val": {"shards": [7]}}},
    {"splits": {"train": {"samples": 1, "shards": [
        {"tar": "../../etc/passwd", "index": "x.idx", "samples": 1, "bytes": 1, "sha256": "0"}]}}},
])
def test_verify_reports_malformed_manifest(sample_shards, tmp_path, manifest):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sample_shards[0], out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(out, workers=1)
    assert problems and all(isinstance(p, str) for p in problems)
    assert any(p.startswith("manifest.json: ") for p in problems)
    r = run_cli("--verify", "--output", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "manifest.json" in r.stderr


# -- atomic and resumable ------------------------------------------------------------------------


def test_resume_keeps_complete_shards_and_rebuilds_the_rest(sample_shards, tmp_path):
    ref_out, ref = sample_shards
    out = tmp_path / "r"
    build_shards(opts("sample", out))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()
    with open(out / "train-000002.tar", "r+b") as f:
        f.seek(3000)
        f.write(b"garbage")
    (out / "val-000000.idx").unlink()
    m = build_shards(opts("sample", out, workers=2))
    assert shard_files(out) == shard_files(ref_out) and m["splits"] == ref["splits"]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert after["train-000000.tar"] == before["train-000000.tar"]
    assert after["train-000001.tar"] != before["train-000001.tar"]
    assert after["train-000002.tar"] != before["train-000002.tar"]
    assert verify_shards(out) == []
    # A different option (seed) is a different dataset: everything is rebuilt, nothing stale left.
    build_shards(opts("sample", out, seed=5, shard_size=100))
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]


def test_interrupted_run_resumes_to_identical_output(sample_shards, tmp_path, monkeypatch):
    from pix2pix_dist.shards import build

    ref_out, _ = sample_shards
    out = tmp_path / "i"
    real_add, calls = build.SplitWriter.add, []

    def add_then_interrupt(self, *a, **kw):  # Ctrl-C arriving while the 8th sample is written
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_add(self, *a, **kw)

    monkeypatch.setattr(build.SplitWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_shards(opts("sample", out))
    monkeypatch.undo()
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    done = sorted(p.name for p in out.glob("*.tar"))
    assert "train-000000.tar" in done and len(done) < 4
    kept = {n: (out / n).stat().st_ino for n in done}
    build_shards(opts("sample", out))
    assert shard_files(out) == shard_files(ref_out)
    assert all((out / n).stat().st_ino == ino for n, ino in kept.items())


@pytest.fixture(scope="module")
def many_pngs(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    base = np.asarray(photo("coffee.png", 200))
    for i in range(120):  # PNGs must be re-encoded: slow enough to interrupt mid-run
        noisy = np.clip(base.astype(np.int16) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(src / f"{i:04d}.png", compress_level=1)
    return src


def assert_rerun_resumes(out: Path, args: list[str], reference: ShardOptions) -> None:
    """After an interruption: no manifest, no .tmp, some complete shards; rerunning the command
    keeps those shards untouched and ends byte-identical to an uninterrupted build."""
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    kept = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert kept
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert all((out / n).stat().st_ino == ino for n, ino in kept.items())
    build_shards(reference)
    assert shard_files(out) == shard_files(reference.output)


def start_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "pix2pix_dist.shards", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_after_first_shard(proc: subprocess.Popen, out: Path) -> None:
    """Freeze the writer (SIGSTOP) once its first shard exists: whatever the test does next
    happens mid-run, however fast the machine, with no race to lose."""
    deadline = time.monotonic() + 60
    while not (out / "train-000000.tar").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer ended before its first shard"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)


@pytest.mark.slow
def test_ctrl_c_on_cli_is_one_line_and_resumable(many_pngs, tmp_path):
    out = tmp_path / "out"
    args = ["--source", str(many_pngs), "--output", str(out), "--shard-size", "2", "--workers", "1", "--no-progress"]
    proc = start_cli(args)
    stop_after_first_shard(proc, out)
    proc.send_signal(signal.SIGINT)  # delivered when it continues, mid-run
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "interrupted: complete shards are kept; run the same command again to resume"]
    assert_rerun_resumes(out, args, reference=opts(many_pngs, tmp_path / "ref", shard_size=2, workers=2))


@pytest.mark.slow
def test_killed_worker_is_one_line_error_and_resumable(many_pngs, tmp_path):
    """A worker killed by the OOM killer (here: SIGKILL) must end the run, not hang it forever."""
    import psutil

    out = tmp_path / "out"
    args = ["--source", str(many_pngs), "--output", str(out), "--shard-size", "2", "--workers", "2",
            "--no-progress", "--resize", "150"]
    proc = start_cli(args)
    stop_after_first_shard(proc, out)
    workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGCONT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the writer hangs after a worker process died")
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: a worker process died (out of memory?) while processing ")
    assert lines[0].endswith("; complete shards are kept, run the same command again to resume")
    assert str(many_pngs) in lines[0]
    assert_rerun_resumes(out, args, reference=opts(many_pngs, tmp_path / "ref", shard_size=2,
                                                    workers=1, resize=150))


@pytest.mark.slow
def test_sigkilled_writer_leaves_no_workers(many_pngs, tmp_path):
    """SIGKILL of the main process (no handler runs): its workers notice and exit."""
    import psutil

    out = tmp_path / "out"
    proc = start_cli(["--source", str(many_pngs), "--output", str(out), "--shard-size", "2",
                      "--workers", "2", "--no-progress"])
    stop_after_first_shard(proc, out)  # workers are running, and blocked once their pipes fill
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [p.pid for p in alive]


def test_broken_pool_becomes_shard_error(tmp_path):
    """The mapping itself, through a real process pool whose worker is killed (as by the OOM
    killer: no exception, just gone)."""
    from pix2pix_dist.shards.images import ImageSettings
    from pix2pix_dist.shards.pool import Executor, Task

    (tmp_path / "a.png").write_bytes(b"x")
    ex = Executor([("folder", str(tmp_path))], ImageSettings(), workers=2)
    try:
        assert [r.reason for r in ex.map([Task(0, 0, "a.png", "k", 1)])] == ["not_an_image"]
        victim = ex.pool.workers[1].process
        victim.kill()
        victim.join()
        with pytest.raises(ShardError, match=r"a worker process died \(out of memory\?\) while processing .*a.png"):
            list(ex.map([Task(0, i, "a.png", f"k{i}", 1) for i in range(40)]))
    finally:
        ex.close(terminate=True)


def _wait_until_mid_message(conn, size: int) -> None:
    """Until half the pipe's buffer holds the start of a `size`-byte message: with size far above
    the pipe's capacity (64 KiB) and nobody reading, the worker is then blocked half-way."""
    import fcntl
    import termios

    capacity = fcntl.fcntl(conn.fileno(), 1032)  # F_GETPIPE_SZ
    assert size > 4 * capacity
    deadline = time.monotonic() + 30
    while True:
        queued = fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0")
        if int.from_bytes(queued, sys.byteorder) >= capacity // 2:
            return
        assert time.monotonic() < deadline, "the worker never started writing its result"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["killed mid-message", "terminate", "normal close"])
def test_half_written_result_never_hangs(how):
    """The `make shards` hang: a worker stopped half-way through writing a multi-MB result must
    not leave anything waiting for the rest. Made deterministic by filling the pipe first."""
    from pix2pix_dist.shards.pool import WorkerDied, WorkerPool

    pool = WorkerPool(bytes, workers=1)  # bytes(n): an n-byte result, like a batch of JPEGs
    results = pool.map([10, 4_000_000, 10])
    try:
        assert next(results) == bytes(10)  # the 4 MB result is now being written, and blocks
        _wait_until_mid_message(pool.workers[0].results, 4_000_000)
        t0 = time.monotonic()
        if how == "killed mid-message":
            pool.workers[0].process.kill()
            with pytest.raises(WorkerDied) as err:
                next(results)
            assert err.value.job == 4_000_000
        elif how == "terminate":
            pool.close(terminate=True)
        else:  # the success path reads the rest and lets the worker finish, killing nothing
            pool.close()
        assert time.monotonic() - t0 < 10
    finally:
        pool.close(terminate=True)


def test_a_map_stopped_early_does_not_leak_into_the_next():
    """--limit with --val-source stops the train stream's map with jobs in flight, then maps the
    val stream on the same pool: the val map got the train leftovers as its own results, or
    nothing at all (every worker's window still full), so val was empty or held train images."""
    from pix2pix_dist.shards.pool import WorkerPool

    pool = WorkerPool(abs, workers=2)
    try:
        first = pool.map(range(-1, -100, -1))
        assert [next(first) for _ in range(3)] == [1, 2, 3]
        del first  # stopped early, as _run_stream does at its cap
        assert list(pool.map(range(1000, 1020))) == list(range(1000, 1020))
    finally:
        pool.close(terminate=True)


@pytest.mark.slow
def test_limit_with_large_results_exits_after_success(tmp_path):
    """The reported reproduction: --limit stops the stream while multi-MB results are in flight."""
    src = tmp_path / "big"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):  # noise JPEGs of ~1.5 MB each, kept as they are (baseline RGB)
        Image.fromarray(rng.integers(0, 256, (700, 800, 3), dtype=np.uint8)).save(src / f"{i}.jpg", quality=95)
    r = run_cli("--source", str(src), "--output", str(tmp_path / "o"), "--limit", "2", "--workers", "2",
                "--shard-size", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "wrote 2 samples" in r.stdout


# -- what the writer refuses, locks and counts ---------------------------------------------------


def test_foreign_shard_files_are_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"another tool's data")
    r = run_cli("--source", "sample", "--output", str(out), "--limit", "3", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "train-000000.tar" in r.stderr and "not written by this tool" in r.stderr
    assert (out / "train-000000.tar").read_bytes() == b"another tool's data"
    # Our own earlier output is ours to replace: a different seed rebuilds it without a word.
    (out / "train-000000.tar").unlink()
    build_shards(opts("sample", out, limit=3))
    build_shards(opts("sample", out, limit=3, seed=1))
    assert verify_shards(out) == []


def test_unreadable_progress_or_foreign_manifest_is_refused_with_its_reason(tmp_path):
    out = tmp_path / "out"
    build_shards(opts("sample", out, limit=3))
    (out / "progress.json").write_text("{half a rec")
    with pytest.raises(ShardError, match=r"progress.json is unreadable \(Expecting"):
        build_shards(opts("sample", out, limit=3))
    assert (out / "progress.json").read_text() == "{half a rec"
    (out / "progress.json").unlink()
    (out / "manifest.json").write_text('{"another": "tool"}')
    with pytest.raises(ShardError, match=r"manifest.json is unreadable \(not a pix2pix_dist-shards/1 manifest"):
        build_shards(opts("sample", out, limit=3))
    assert (out / "manifest.json").read_text() == '{"another": "tool"}'


def test_user_tmp_and_lock_files_in_the_output_are_never_removed_or_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train-000000.tar.tmp", "val-000000.idx.tmp", ".lock"):
        (out / name).write_bytes(b"the user's " + name.encode())
    r = run_cli("--source", "sample", "--output", str(out), "--limit", "3", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert ".lock exists and is not a lock file of pix2pix_dist" in r.stderr
    (out / ".lock").unlink()
    r = run_cli("--source", "sample", "--output", str(out), "--limit", "3", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "holds train-000000.tar.tmp and 1 more, not written by this tool" in r.stderr
    for name in ("train-000000.tar.tmp", "val-000000.idx.tmp"):
        assert (out / name).read_bytes() == b"the user's " + name.encode()


def test_tmp_files_of_a_killed_run_are_removed_by_the_next(sample_shards, tmp_path, monkeypatch):
    """What a SIGKILL leaves (a finished tar not yet recorded, an open one) is the writer's by
    its progress record: the rerun removes it and ends identical to an uninterrupted build."""
    from pix2pix_dist.shards import build

    class Killed(BaseException):
        pass

    real_checkpoint, calls = build.Builder._checkpoint, []

    def die_before_the_second_record(self):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        real_checkpoint(self)

    monkeypatch.setattr(build.Builder, "_checkpoint", die_before_the_second_record)
    monkeypatch.setattr(build.TarShard, "abort", lambda self: None)  # SIGKILL cleans nothing up
    out = tmp_path / "k"
    with pytest.raises(Killed):
        build_shards(opts("sample", out))
    monkeypatch.undo()
    assert {p.name for p in out.glob("*.tmp")} == {  # finished but unrecorded, and still open
        "train-000001.tar.tmp", "train-000001.idx.tmp", "val-000000.tar.tmp"}
    build_shards(opts("sample", out))
    assert not list(out.glob("*.tmp")) and shard_files(out) == shard_files(sample_shards[0])


@pytest.mark.parametrize("name", ["manifest.json", "progress.json"])
def test_a_fifo_in_place_of_a_record_is_refused_never_opened(tmp_path, name):
    out = tmp_path / "out"
    build_shards(opts("sample", out, limit=3))
    (out / name).unlink()
    os.mkfifo(out / name)  # open() for reading would wait for a writer forever
    r = run_cli("--source", "sample", "--output", str(out), "--limit", "3", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{name} is unreadable (" in r.stderr and "not a regular file" in r.stderr
    r = run_cli("--verify", "--output", str(out))
    assert r.returncode == (1 if name == "manifest.json" else 0), r.stderr
    if name == "manifest.json":
        assert "manifest.json: cannot be read (not a regular file" in r.stderr


def test_second_writer_and_verify_are_refused_while_one_writes(tmp_path):
    """Two processes: this one holds the output folder as a writer does; the CLI is refused."""
    from pix2pix_dist.locking import FolderLock

    out = tmp_path / "out"
    build_shards(opts("sample", out, limit=3))
    with FolderLock(out, "shard writer"):
        for args in (["--source", "sample", "--limit", "3"], ["--verify"]):
            r = run_cli(*args, "--output", str(out), "--no-progress")
            assert r.returncode == 2, r.stderr
            assert r.stderr.count("\n") == 1 and "in use by another shard writer" in r.stderr
            assert f"pid {os.getpid()}" in r.stderr
    assert run_cli("--verify", "--output", str(out)).returncode == 0


def png_bytes(array: np.ndarray) -> bytes:
    """A PNG of a uint16 (H,W) or (H,W,3) array, 16 bits per sample (PIL cannot write 48-bit RGB)."""
    import struct
    import zlib

    colour = 2 if array.ndim == 3 else 0
    rows = array.reshape(array.shape[0], -1).astype(">u2").tobytes()
    stride = array[0].size * 2
    raw = b"".join(b"\0" + rows[i * stride:(i + 1) * stride] for i in range(array.shape[0]))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", array.shape[1], array.shape[0], 16, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A palette PNG that claims width x height but holds almost no data: decoding it would be
    reported as truncated, so `too_large` proves it was refused from the header."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    body = [(b"IHDR", ihdr), (b"PLTE", bytes(range(48))), (b"IDAT", zlib.compress(bytes(1000)))]
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in body)


def test_sixteen_bit_colour_keeps_its_colours_and_gray_is_dropped(tmp_path):
    colour = (np.asarray(photo("coffee.png"), dtype=np.uint16) * 257)  # 8-bit values, 16-bit range
    gray = (np.asarray(photo("coffee.png").convert("L"), dtype=np.uint16) * 257)
    src = tmp_path / "src"
    src.mkdir()
    (src / "colour16.png").write_bytes(png_bytes(colour))
    (src / "gray16.png").write_bytes(png_bytes(gray))
    assert Image.open(src / "gray16.png").mode.startswith("I")
    m = build_shards(opts(src, tmp_path / "o", val_fraction=0.0))
    assert m["skipped"] == {"grayscale": 1} and m["skipped_examples"]["grayscale"] == ["gray16.png"]
    jpg, _ = read_samples(tmp_path / "o", "train")["colour16"]
    decoded = np.asarray(Image.open(io.BytesIO(jpg)), dtype=np.int16)
    assert np.abs(decoded - colour // 257).mean() < 3  # the photo's colours, not white or black


def test_pixel_bombs_are_counted_too_large_undecoded(tmp_path):
    from pix2pix_dist.imageio import Skip, open_bounded

    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.png").write_bytes(png_header_only(13000, 13000))  # 169 MP in ~1 KB
    (src / "good.jpg").write_bytes(jpeg_bytes(photo("coffee.png")))
    m = build_shards(opts(src, tmp_path / "o", val_fraction=0.0))
    assert m["skipped"] == {"too_large": 1} and m["args"]["max_pixels"] == 50_000_000
    # Above PIL's own bomb limit (2 x 89 MP) with a generous --max-pixels: still a counted skip.
    (src / "bomb.png").write_bytes(png_header_only(20000, 20000))
    m = build_shards(opts(src, tmp_path / "o2", val_fraction=0.0, max_pixels=10**12))
    assert m["skipped"] == {"too_large": 1}
    with pytest.raises(Skip, match="13000x13000") as info:
        open_bounded(io.BytesIO(png_header_only(13000, 13000)), 50_000_000)
    assert info.value.reason == "too_large"
    r = run_cli("--source", str(src), "--output", str(tmp_path / "o3"), "--max-pixels", "0", "--no-progress")
    assert r.returncode == 2 and "--max-pixels" in r.stderr


def test_fifos_and_unlistable_folders_are_counted_never_opened(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.jpg").write_bytes(jpeg_bytes(photo("coffee.png")))
    os.mkfifo(src / "pipe.jpg")  # opening it for reading would block forever
    make_unlistable_folder(src)
    m = build_shards(opts(src, tmp_path / "o", val_fraction=0.0, workers=2))
    assert m["skipped"] == {"not_a_file": 1, "unreadable": 1}, m["skipped"]
    assert m["skipped_examples"]["not_a_file"] == ["pipe.jpg"]
    assert m["skipped_examples"]["unreadable"][0].endswith("d/")
    assert m["splits"]["train"]["samples"] == 1


def test_odd_file_names_and_damaged_zips(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.jpg").write_bytes(jpeg_bytes(photo("coffee.png")))
    (src / "line\nbreak.jpg").write_bytes(b"not an image at all, just text")
    with open(os.fsencode(src) + b"/caf\xe9.jpg", "wb") as f:
        f.write(b"\x00\x01 binary junk")
    r = run_cli("--source", str(src), "--output", str(tmp_path / "o"), "--val-fraction", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "line\\nbreak.jpg" in r.stdout and "caf\\xe9.jpg" in r.stdout
    assert "Traceback" not in r.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sorted(sum(manifest["skipped_examples"].values(), [])) == ["caf\\xe9.jpg", "line\\nbreak.jpg"]
    # A zip cut short (no central directory) is named as a damaged zip, not as "not a source".
    zpath = tmp_path / "train2017.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("train2017/1.jpg", jpeg_bytes(photo("coffee.png")))
    zpath.write_bytes(zpath.read_bytes()[:-30])
    r = run_cli("--source", str(zpath), "--output", str(tmp_path / "z"), "--no-progress")
    assert r.returncode == 2 and r.stderr.startswith(f"error: damaged zip {zpath}") and r.stderr.count("\n") == 1
