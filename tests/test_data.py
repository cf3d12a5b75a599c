"""Input pipeline on the CPU: both backends on the same shards, sharding, epochs, errors.

Most tests use small shards written here (crops of scikit-image's photos), so counts and
corrupt samples are under control; one test reads the real shard writer's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms as T
from PIL import Image

from pix2pix_dist.config import DataConfig, build_config
from pix2pix_dist.data import DataError, build_loader, rgb_to_lab
from pix2pix_dist.data.dali_pipeline import build_pipeline
from pix2pix_dist.data.geometry import Augment, decode
from pix2pix_dist.data.shards_index import find_shards
from pix2pix_dist.export import InferenceSettings, generator_meta
from pix2pix_dist.inference import training_view
from pix2pix_dist.shard_format import FORMAT, MANIFEST, index_name, load_manifest, shard_name

BACKENDS = ["dali", "torch"]
CPU = torch.device("cpu")
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel"]


def write_shards(out: Path, split: str, count: int, per_shard: int, *, corrupt: tuple[int, ...] = (),
                 index: bool = True, manifest: bool = True) -> Path:
    """`count` JPEG samples (random crops of the photos, 80-140 px) as {split}-NNNNNN.tar,
    optionally with wds2idx index files and a manifest; samples in `corrupt` are truncated."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(split))
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    entries = []
    for first in range(0, count, per_shard):
        tar = out / shard_name(split, first // per_shard)
        with tarfile.open(tar, "w") as tf:
            for i in range(first, min(count, first + per_shard)):
                photo = photos[i % len(photos)]
                h, w = photo.shape[:2]
                ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                size = (int(rng.integers(80, 140)), int(rng.integers(80, 140)))
                buf = io.BytesIO()
                Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size).save(buf, "JPEG", quality=90)
                jpg = buf.getvalue()[:300] if i in corrupt else buf.getvalue()
                for ext, data in (("jpg", jpg), ("json", json.dumps({"i": i}).encode())):
                    member = tarfile.TarInfo(f"{split}{i:05d}.{ext}")
                    member.size = len(data)
                    tf.addfile(member, io.BytesIO(data))
        if index:
            subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar), str(out / index_name(tar.name))],
                           check=True, capture_output=True)
        entries.append({"tar": tar.name, "index": index_name(tar.name),
                        "samples": min(count, first + per_shard) - first, "bytes": tar.stat().st_size,
                        "sha256": hashlib.sha256(tar.read_bytes()).hexdigest()})
    if manifest:
        path = out / MANIFEST
        data = load_manifest(out) if path.exists() else {"format": FORMAT, "splits": {}, "skipped": {}}
        data["splits"][split] = {"samples": count, "shards": entries}
        path.write_text(json.dumps(data))
    return out


def one_photo_shard(folder: Path, photo: np.ndarray, quality: int = 95, copies: int = 4) -> bytes:
    """A train shard in `folder` holding `copies` samples of one JPEG of `photo` (HWC uint8);
    returns the JPEG's bytes."""
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=quality)
    jpg = buf.getvalue()
    with tarfile.open(folder / shard_name("train", 0), "w") as tf:
        for i in range(copies):
            member = tarfile.TarInfo(f"s{i}.jpg")
            member.size = len(jpg)
            tf.addfile(member, io.BytesIO(jpg))
    return jpg


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data_shards")
    write_shards(out, "train", 23, per_shard=8)  # 23: ranks of world 2 get 11 and 12 samples
    write_shards(out, "val", 12, per_shard=8)
    return out


def config(root: Path, backend: str, **kw) -> DataConfig:
    base = dict(shards=str(root), backend=backend, load_size=72, crop_size=64,
                num_threads=2, shuffle_buffer=16, prefetch=2)
    return DataConfig(**{**base, **kw})


def loader(root: Path, backend: str, split: str = "train", rank: int = 0, world: int = 1,
           seed: int = 0, train: bool | None = None, batch_size: int = 4, **kw):
    return build_loader(find_shards(root, split), config(root, backend, **kw),
                        batch_size=batch_size, rank=rank, world_size=world, device=CPU, seed=seed,
                        train=train)


def epoch(ld, with_keys: bool = False) -> list:
    return list(ld.iter_with_keys() if with_keys else ld)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rrc", [False, True])
def test_batches_have_the_promised_form(shards, backend, rrc):
    ld = loader(shards, backend, random_resized_crop=rrc)
    assert ld.backend == backend and len(ld) == 23 // 4
    batches = epoch(ld)
    assert len(batches) == len(ld)
    for L, ab in batches:
        assert L.shape == (4, 1, 64, 64) and ab.shape == (4, 2, 64, 64)
        assert L.dtype == ab.dtype == torch.float32 and L.device == ab.device == CPU
        assert L.is_contiguous() and ab.is_contiguous()
        assert L.min() >= -1 and L.max() <= 1 and ab.abs().max() <= 1
        assert L.std() > 0.05 and ab.std() > 0.01  # real photos, not padding


def _stats(batches) -> torch.Tensor:
    L = torch.cat([b[0] for b in batches])
    ab = torch.cat([b[1] for b in batches])
    return torch.stack([L.mean(), L.std(), ab[:, 0].mean(), ab[:, 1].mean(), ab.std()])


def test_backends_agree_on_the_same_shards(shards):
    """Validation is deterministic in both: same samples, near-identical Lab (the resize
    kernels differ slightly), training statistics close."""
    val = {b: epoch(loader(shards, b, "val"), with_keys=True) for b in BACKENDS}
    keys = {b: sorted(k for batch in val[b] for k in batch[2]) for b in BACKENDS}
    assert keys["dali"] == keys["torch"] and len(keys["dali"]) == 12
    images = {b: {k: (L[i], ab[i]) for L, ab, ks in val[b] for i, k in enumerate(ks)} for b in BACKENDS}
    for key, (L, ab) in images["dali"].items():
        L_t, ab_t = images["torch"][key]
        assert (L.mean() - L_t.mean()).abs() < 0.01, key  # 0.5 L units
        assert (ab.mean((1, 2)) - ab_t.mean((1, 2))).abs().max() < 0.015, key  # 1.6 ab units
        assert (L - L_t).abs().mean() < 0.08 and (ab - ab_t).abs().mean() < 0.03, key
    train = {b: _stats(epoch(loader(shards, b, "train"))) for b in BACKENDS}
    assert (train["dali"] - train["torch"]).abs().max() < 0.08, train


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("resize", ["shorter_side", "square"])
@pytest.mark.parametrize("train", [False, True])
def test_resize_is_bicubic_as_in_the_pix2pix_reference(tmp_path, backend, resize, train):
    """pix2pix (get_transform) and the tutorial resize with PIL's BICUBIC. A square photo, so
    both modes and both paths (no crop left, no flip) are one 160 -> 64 resize: torchvision's
    antialiased bicubic is PIL's within rounding, DALI's cubic is close to it; both are far
    from PIL's bilinear."""
    jpg = one_photo_shard(tmp_path, skimage.data.astronaut()[40:200, 160:320])
    L, _ = next(iter(loader(tmp_path, backend, train=train, resize=resize, load_size=64,
                            flip=False)))
    photo = Image.open(io.BytesIO(jpg)).convert("RGB")

    def error(interpolation) -> float:  # mean |L - L of PIL's resize|, in L units
        ref = np.asarray(photo.resize((64, 64), interpolation), dtype=np.float32) / 255
        ref_L, _ = rgb_to_lab(torch.from_numpy(ref).permute(2, 0, 1)[None])
        return float((L - ref_L).abs().mean()) * 50

    assert error(Image.BICUBIC) < 0.2 and error(Image.BILINEAR) > 0.4


@pytest.mark.parametrize("train", [True, False])
def test_paper_geometry_is_the_reference_squash_and_crop_on_both_backends(tmp_path, train):
    """The `paper` preset against pix2pix's `resize_and_crop`, written independently with
    torchvision on a PIL image: Resize([286, 286], BICUBIC), then a 256 crop at the same offsets
    (training: those our generator drew; validation: the centre, our fixed stand-in for the
    reference's random test crop). A 451x300 photo, so a shorter-side resize would not match."""
    data = dataclasses.replace(build_config("paper").data, shards=str(tmp_path), flip=False,
                               num_threads=1)
    jpg = one_photo_shard(tmp_path, skimage.data.chelsea())
    photo = Image.open(io.BytesIO(jpg)).convert("RGB")
    squashed = T.Resize([286, 286], T.InterpolationMode.BICUBIC)(photo)
    reference = torch.from_numpy(np.array(squashed)).permute(2, 0, 1).int()
    span = 286 - 256

    def offset_error(img: torch.Tensor, top: int, left: int) -> torch.Tensor:
        return (img.int() - reference[:, top:top + 256, left:left + 256]).abs()

    # torch backend: decode + Augment, as torch_pipeline.py runs them per sample
    augment = Augment(data.crop_size, data.load_size, train, data.flip, data.random_resized_crop,
                      data.rrc_min_scale, data.resize)
    decoded = decode(torch.frombuffer(bytearray(jpg), dtype=torch.uint8))
    for seed in range(3):
        img = augment(decoded, random.Random(seed))
        replay = random.Random(seed)
        top, left = (replay.randint(0, span), replay.randint(0, span)) if train else (15, 15)
        assert offset_error(img, top, left).max() <= 1, (seed, top, left)
    if not train:  # evaluation's view of a paper export is validation's
        settings = InferenceSettings(**generator_meta(build_config("paper"), 0)["inference"])
        assert torch.equal(training_view(decoded, settings), img)

    # DALI on the CPU: its random offsets cannot be replayed, so each image is compared with the
    # reference crop that matches it best (validation: the centre). DALI's antialiased cubic is
    # near PIL's bicubic, not identical: measured, 1 value in 200,000 is 2 levels off.
    pipe = build_pipeline(find_shards(str(tmp_path), "train"), data, batch_size=4, train=train,
                          rank=0, world_size=1, device_id=None, seed=1)
    pipe.build()
    tops = set()
    for out in pipe.run()[0]:
        img = torch.from_numpy(np.asarray(out))
        if train:
            corner = img[:, :48, :48].int()  # found on a corner, checked on the whole crop
            _, top, left = min(((corner - reference[:, t:t + 48, l:l + 48]).abs().sum().item(), t, l)
                               for t in range(span + 1) for l in range(span + 1))
        else:
            top = left = 15
        tops.add(top)
        error = offset_error(img, top, left)
        assert error.float().mean() < 0.3 and (error > 1).float().mean() < 1e-4 and error.max() <= 2
    assert len(tops) > 1 if train else tops == {15}  # training crops move


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_read_disjoint_parts_with_equal_batch_counts(shards, backend):
    ranks = [loader(shards, backend, rank=r, world=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 23 // (2 * 4)
    seen: list[set[str]] = [set(), set()]
    for _ in range(2):  # the split holds across epochs, not only the first
        for r, ld in enumerate(ranks):
            batches = epoch(ld, with_keys=True)
            assert len(batches) == len(ld)
            seen[r] |= {k for _, _, keys in batches for k in keys}
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # DALI's sharding: rank 0 reads the first 11 of the 23 samples in shard order.
    assert all(int(k[-5:]) < 11 for k in seen[0]) and all(int(k[-5:]) >= 11 for k in seen[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_is_identical_every_pass(shards, backend):
    first = epoch(loader(shards, backend, "val"))
    again = loader(shards, backend, "val")
    for run in (epoch(again), epoch(again)):  # a new loader, then a second pass of it
        assert len(run) == len(first) == 3
        for (L, ab), (L2, ab2) in zip(first, run):
            assert torch.equal(L, L2) and torch.equal(ab, ab2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_epochs_differ_and_repeat_from_the_seed(shards, backend):
    ld = loader(shards, backend, seed=3)
    epoch0, epoch1 = epoch(ld), epoch(ld)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))
    fresh = loader(shards, backend, seed=3)
    fresh.set_epoch(0)
    for (L, ab), (L2, ab2) in zip(epoch0, epoch(fresh)):
        assert torch.equal(L, L2) and torch.equal(ab, ab2)
    other_seed = epoch(loader(shards, backend, seed=4))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, other_seed))


def test_torch_backend_reproduces_any_epoch(shards):
    ld = loader(shards, "torch", seed=1)
    epochs = [epoch(ld) for _ in range(3)]
    fresh = loader(shards, "torch", seed=1)
    fresh.set_epoch(2)
    for (L, _), (L2, _) in zip(epochs[2], epoch(fresh)):
        assert torch.equal(L, L2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_shards_name_the_path(tmp_path, backend):
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(DataError, match="make shards") as err:
            loader(root, backend)
        assert str(root) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_few_samples_gives_the_numbers(shards, backend):
    with pytest.raises(DataError, match=r"12 samples.* 2 x 8 = 16"):
        loader(shards, backend, "val", world=2, batch_size=8)


def test_folder_without_manifest_or_index(tmp_path):
    write_shards(tmp_path, "train", 10, per_shard=4, index=False, manifest=False)
    for backend in BACKENDS:
        ld = loader(tmp_path, backend, batch_size=3)
        assert len(ld) == 3 and len(epoch(ld)) == 3


def test_torch_backend_skips_and_counts_corrupt_samples(tmp_path, capsys):
    write_shards(tmp_path, "train", 14, per_shard=5, corrupt=(2, 7))
    ld = loader(tmp_path, "torch")  # 12 good samples: exactly the 3 batches of 4 an epoch needs
    batches = epoch(ld, with_keys=True)
    assert "warning: skipped corrupt sample train00002 in shard train-000000.tar" in capsys.readouterr().err
    assert ld.skipped == 2 and len(batches) == len(ld) == 3
    keys = {k for _, _, ks in batches for k in ks}
    assert len(keys) == 12 and not keys & {"train-000000.tar/train00002", "train-000001.tar/train00007"}


def test_torch_backend_tops_up_an_epoch_short_of_good_samples(tmp_path):
    """Skips must not shorten an epoch (that would hang DDP): the rank's part is read again."""
    write_shards(tmp_path, "train", 12, per_shard=5, corrupt=(2, 7))
    ld = loader(tmp_path, "torch")
    batches = epoch(ld)
    assert len(batches) == len(ld) == 3 and ld.skipped >= 2


def test_torch_backend_all_corrupt_ends_with_an_error(tmp_path):
    write_shards(tmp_path, "train", 4, per_shard=4, corrupt=(0, 1, 2, 3))
    with pytest.raises(DataError, match="too few decodable"):
        epoch(loader(tmp_path, "torch", batch_size=2))


def test_dali_corrupt_sample_raises_a_data_error_naming_it(tmp_path):
    """DALI cannot skip a sample its decoder rejects: the pipeline fails, and the loader
    reports which shard and key after a CPU scan, instead of hanging or crashing obscurely."""
    write_shards(tmp_path, "train", 12, per_shard=5, corrupt=(7,))
    ld = loader(tmp_path, "dali", batch_size=2)
    with pytest.raises(DataError, match=r"train-000001\.tar/train00007 does not decode"):
        epoch(ld)


def test_auto_falls_back_to_torch_without_dali(shards, monkeypatch, capsys):
    ld = loader(shards, "auto")
    assert ld.backend == "dali"  # installed here
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed
    assert loader(shards, "auto").backend == "torch"
    assert loader(shards, "auto", rank=1, world=2).backend == "torch"
    assert loader(shards, "auto", "val").backend == "torch"
    assert capsys.readouterr().err.count("DALI is not installed") == 1  # warn() writes to stderr
    with pytest.raises(DataError, match="nvidia-dali"):
        loader(shards, "dali")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_the_shard_writers_output(sample_shards, backend):
    train = loader(sample_shards, backend, batch_size=2)
    val = loader(sample_shards, backend, "val", batch_size=2)
    manifest = load_manifest(sample_shards)
    assert len(train) == manifest["splits"]["train"]["samples"] // 2
    for ld in (train, val):
        batches = epoch(ld)
        assert len(batches) == len(ld) >= 1
        assert all(L.shape == (2, 1, 64, 64) and ab.shape == (2, 2, 64, 64) for L, ab in batches)


def test_interrupted_shard_folder_is_refused_not_half_used(sample_shards, tmp_path):
    import shutil


    partial = tmp_path / "partial"
    shutil.copytree(sample_shards, partial)
    (partial / "manifest.json").unlink()  # the writer removes it while working
    (partial / "progress.json").write_text("{}")
    with pytest.raises(DataError, match="incomplete .*run the same command again"):
        find_shards(partial, "train")


def test_malformed_manifest_entry_is_a_one_line_error(sample_shards, tmp_path):
    import json
    import shutil


    broken = tmp_path / "broken"
    shutil.copytree(sample_shards, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["tar"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="is malformed .*train shard 0 has missing or invalid tar"):
        find_shards(broken, "train")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("manifest", [True, False])
def test_shard_truncated_after_writing_is_one_line(tmp_path, backend, manifest):
    """With a manifest the size check names it before any pipeline starts; without one (another
    tool's shards) each backend's own read error becomes the same kind of one-line DataError."""
    write_shards(tmp_path, "train", 12, per_shard=6, manifest=manifest)
    tar = tmp_path / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(DataError) as err:
        epoch(loader(tmp_path, backend, batch_size=2))
    message = str(err.value)
    assert "\n" not in message and "train-000001.tar" in message and "make shards" in message, message
    assert ("truncated or changed" if manifest else "is damaged") in message


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_shard_is_one_line_on_the_gpu(tmp_path, backend):
    """The same conversion where DALI decodes with device="mixed" and torch with nvJPEG."""
    write_shards(tmp_path, "train", 12, per_shard=6, manifest=False)
    tar = tmp_path / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    ld = build_loader(find_shards(tmp_path, "train"), config(tmp_path, backend), batch_size=2,
                      rank=0, world_size=1, device=torch.device("cuda"), seed=0)
    with pytest.raises(DataError, match=r"train-000001\.tar is damaged") as err:
        epoch(ld)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("resize_mode", ["shorter_side", "square"])
def test_geometry_resize_is_torchvisions_without_importing_it(resize_mode):
    """data/geometry.resize calls torch directly (inference must not import torchvision); it
    must stay torchvision's resize exactly: sizes, rounding, up and down."""
    import torchvision.transforms.v2.functional as TF

    from pix2pix_dist.data.geometry import resize

    gen = torch.Generator().manual_seed(0)
    for height, width in [(100, 150), (151, 97), (300, 300), (40, 50), (50, 1000)]:
        img = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen)
        for side in (64, 72, 256):
            size = [side, side] if resize_mode == "square" else [side]
            expected = TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            assert torch.equal(resize(img, side, resize_mode), expected), (height, width, side)


def test_torch_backend_keeps_its_workers_across_epochs_and_restarts_after_a_jump(shards):
    """No worker start per epoch (issue 15: it made the fallback 0.28x the tutorial's loader on
    small splits), and the order stays a function of (seed, epoch, rank): an epoch left half
    read, or a jump to another epoch, restarts the workers at the epoch asked for."""
    ld = loader(shards, "torch", seed=5)
    epoch0 = epoch(ld)
    workers = [w.pid for w in ld._impl._stream._workers]
    epoch1 = epoch(ld)
    assert [w.pid for w in ld._impl._stream._workers] == workers and len(workers) == 2
    next(iter(ld))  # epoch 2, left after one batch
    ld.set_epoch(1)
    again = epoch(ld)
    assert [w.pid for w in ld._impl._stream._workers] != workers
    fresh = loader(shards, "torch", seed=5)
    for a, b in zip(epoch0 + epoch1 + epoch1, epoch(fresh) + epoch(fresh) + again):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dali_cpu_batches_convert_to_lab_without_changing_the_thread_count(shards):
    """The CPU-side Lab step runs on one intra-op thread (loader._to_lab) and gives back the
    caller's setting; the values agree with the torch backend's, converted in its workers."""
    threads = torch.get_num_threads()
    L, ab, keys = epoch(loader(shards, "dali", "val"), with_keys=True)[0]
    assert torch.get_num_threads() == threads
    val = loader(shards, "torch", "val")  # the same images, converted in its workers
    L2, ab2, keys2 = epoch(val, with_keys=True)[0]
    assert keys == keys2 and L.shape == L2.shape
    assert (L - L2).abs().mean() < 0.08  # DALI's and torchvision's resize differ slightly
