"""Evaluation: metric definitions, gray baseline, over-fitting, 2-process gathering, exports."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.color import lab2rgb
from skimage.metrics import structural_similarity

from conftest import REPO, run_python
from pix2pix_dist.config import build_config
from pix2pix_dist.data.lab import uint8_to_lab
from pix2pix_dist.data.shards_index import find_shards, find_splits
from pix2pix_dist.colorize import main as colorize_main
from pix2pix_dist.evaluate import best_and_worst
from pix2pix_dist.evaluate import main as evaluate_main
from pix2pix_dist.evaluation import (NOT_COMPUTED, Evaluation, ImageResult, Tiles, TrainingEval,
                                     evaluate_samples, read_split, summary)
from pix2pix_dist.export import (INFERENCE_KEY, MODEL_KEY, ExportError, InferenceSettings,
                                 export_generator, generator_meta, load_export)
from pix2pix_dist.imageio import first_line
from pix2pix_dist.inference import training_view
from pix2pix_dist.metrics import (FID_WEIGHTS, LPIPS_FILES, Lpips, ab_l1, colourfulness,
                                  frechet_distance, image_metrics, lpips_network, psnr, ssim)
from pix2pix_dist.generators import build_generator
from pix2pix_dist.models import UNetGenerator, init_weights

TINY = [("model.num_downs", 6), ("model.ngf", 8), ("data.crop_size", 64), ("data.load_size", 72)]


def tiny_export(path: Path, shards: Path | str = "unused", **overrides: object) -> Path:
    """A freshly initialised unet_64 export with a config.json beside it (a run folder)."""
    cfg = build_config(None, overrides=[*TINY, ("data.shards", str(shards)), *overrides.items()])
    torch.manual_seed(0)
    generator = build_generator(generator_meta(cfg, 7)["model"])
    init_weights(generator)
    path.mkdir(parents=True, exist_ok=True)
    export_generator(generator, path / "generator.safetensors", generator_meta(cfg, 7))
    cfg.save(path / "config.json")
    return path / "generator.safetensors"


# --- metrics ---------------------------------------------------------------------------------

def test_psnr_of_a_constant_offset_is_the_closed_form_value():
    truth = np.full((16, 16, 3), 100, np.uint8)
    pred = truth + np.uint8(10)
    assert psnr(pred, truth) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)
    assert psnr(truth, truth) == 100.0  # identical images: capped, so averages stay finite


def test_ssim_is_scikit_image_on_rgb_in_unit_range():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    pred = np.clip(truth.astype(int) + rng.integers(-30, 30, truth.shape), 0, 255).astype(np.uint8)
    expected = structural_similarity(truth / 255.0, pred / 255.0, data_range=1.0, channel_axis=2)
    assert ssim(pred, truth) == pytest.approx(expected, abs=1e-12)
    assert 0.2 < ssim(pred, truth) < 0.99 and ssim(truth, truth) == pytest.approx(1.0)


def test_ab_l1_is_in_lab_units():
    lab = np.zeros((8, 8, 3))
    lab[..., 0], lab[..., 1], lab[..., 2] = 50.0, 20.0, -10.0
    pred = (lab2rgb(lab) * 255).round().astype(np.uint8)
    lab[..., 1:] = 0.0
    gray = (lab2rgb(lab) * 255).round().astype(np.uint8)
    # |20| and |-10| averaged over both channels: 15, up to uint8 rounding of the renderings.
    assert ab_l1(pred, gray) == pytest.approx(15.0, abs=0.5)


def test_colourfulness_matches_hasler_susstrunk_by_hand():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :, 0] = 255  # top half pure red: rg = 255, yb = 127.5
    image[2:, :, 2] = 255  # bottom half pure blue: rg = 0, yb = -255
    # rg: mean 127.5, std 127.5; yb: mean -63.75, std 191.25 (population std, as in the paper).
    expected = math.sqrt(127.5**2 + 191.25**2) + 0.3 * math.sqrt(127.5**2 + 63.75**2)
    assert colourfulness(image) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(272.62, abs=0.01)
    assert colourfulness(np.full((4, 4, 3), 77, np.uint8)) == 0.0


def test_image_metrics_keys_and_dcf_sign():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    dull = ((truth.astype(int) + truth.mean(axis=2, keepdims=True)) // 2).astype(np.uint8)
    m = image_metrics(dull, truth)
    assert m["dcf"] == pytest.approx(m["cf_truth"] - m["cf_pred"]) and m["dcf"] > 0


# --- evaluation on real shards -----------------------------------------------------------------

def _samples(shards: Path, split: str = "val"):
    data = find_shards(shards, split)
    return list(read_split(data, 0, data.total))


def test_gray_baseline_dcf_equals_truth_colourfulness(sample_shards, tmp_path):
    exported = load_export(tiny_export(tmp_path / "run"))
    result = evaluate_samples(exported.generator, exported.settings, "eval",
                              iter(_samples(sample_shards)), device=torch.device("cpu"),
                              full_res=True)
    assert result.results and not result.skipped
    for r in result.results:
        for gray in (r.gray, r.full_gray):
            assert gray["cf_pred"] == 0.0
            assert gray["dcf"] == gray["cf_truth"] > 5


def test_skip_warnings_keep_an_odd_key_on_one_line(tmp_path, capsys):
    exported = load_export(tiny_export(tmp_path / "run"))
    thin = torch.zeros(3, 8, 200, dtype=torch.uint8)
    samples = [(0, "s/line\nbreak\udcff", "no .jpg member"), (1, "s/thin\r", thin)]
    result = evaluate_samples(exported.generator, exported.settings, "eval", iter(samples),
                              device=torch.device("cpu"), full_res=True)
    assert result.skipped == {"undecodable": 1, "too_thin": 1}
    assert capsys.readouterr().err.splitlines() == [
        "warning: skipped s/line\\nbreak\\xff: no .jpg member",
        "warning: skipped s/thin\\r: 200x8 pixels: inputs need a shorter side of at least 16 px "
        "and an aspect ratio of at most 8:1"]


@pytest.fixture
def one_thread():
    """Tiny convolutions on a shared 2-core machine: extra threads only contend (25x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_an_overfitted_model_beats_the_gray_baseline_on_its_training_images(sample_shards, one_thread):
    settings = InferenceSettings(crop_size=32)
    samples = _samples(sample_shards, "train")[:4]
    views = torch.stack([training_view(rgb, settings) for _, _, rgb in samples])
    L, ab = uint8_to_lab(views)
    torch.manual_seed(0)
    generator = UNetGenerator(num_downs=5, ngf=8, dropout=False)
    init_weights(generator)
    opt = torch.optim.Adam(generator.parameters(), lr=3e-3, betas=(0.5, 0.999))
    for _ in range(100):  # L1 only: memorise four images
        opt.zero_grad()
        torch.nn.functional.l1_loss(generator(L), ab).backward()
        opt.step()
    result = evaluate_samples(generator, settings, "eval", iter(samples), device=torch.device("cpu"))
    means = summary(result.results)["train_res"]
    assert means["model"]["ab_l1"] < 0.5 * means["gray"]["ab_l1"]
    assert means["model"]["psnr"] > means["gray"]["psnr"] + 3
    assert means["model"]["dcf"] < means["gray"]["dcf"]


def test_norm_modes_differ_and_the_recorded_one_is_used(sample_shards, tmp_path, capsys):
    export = tiny_export(tmp_path / "run", sample_shards, **{"eval.norm_mode": "batch"})
    exported = load_export(export)
    assert exported.settings.norm_mode == "batch"
    samples = _samples(sample_shards)
    by_mode = {mode: evaluate_samples(exported.generator, exported.settings, mode, iter(samples),
                                      device=torch.device("cpu")).results
               for mode in ("eval", "batch")}
    assert by_mode["eval"][0].model["ab_l1"] != pytest.approx(by_mode["batch"][0].model["ab_l1"])
    # batch mode is deterministic per image (seeded dropout), whatever ran before
    again = evaluate_samples(exported.generator, exported.settings, "batch", iter(samples[::-1]),
                             device=torch.device("cpu")).results[::-1]
    assert [r.model for r in again] == [r.model for r in by_mode["batch"]]

    assert evaluate_main([str(tmp_path / "run"), "--name", "rec"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "eval" / "rec.json").read_text())
    assert report["settings"]["norm_mode"] == "batch"
    assert report["metrics"]["train_res"]["model"]["ab_l1"] == pytest.approx(
        np.mean([r.model["ab_l1"] for r in by_mode["batch"]]))
    assert "gray baseline" in out and "not computed (no local weights)" in out
    for suffix in (".md", "-gallery.png", "-best-worst.png"):
        assert (tmp_path / "run" / "eval" / f"rec{suffix}").is_file()

    assert evaluate_main([str(tmp_path / "run"), "--name", "nogal", "--gallery", "0", "--limit", "2"]) == 0
    assert "-gallery.png" not in capsys.readouterr().out  # says only what it wrote
    assert not (tmp_path / "run" / "eval" / "nogal-gallery.png").exists()


def test_best_and_worst_are_ranked_by_ab_l1_and_captioned():
    tile = torch.zeros(3, 8, 8, dtype=torch.uint8)
    l1s = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5]
    merged = Evaluation([ImageResult(i, f"k{i}", {"ab_l1": v}, {}) for i, v in enumerate(l1s)], {},
                        {i: Tiles(f"k{i}", tile, tile, tile) for i in range(len(l1s))})
    keys = [t.key for t in best_and_worst(merged)]
    assert keys == ["ab-L1 0.50  k9", "ab-L1 1.00  k1", "ab-L1 2.00  k5", "ab-L1 3.00  k3",
                    "ab-L1 6.00  k8", "ab-L1 7.00  k4", "ab-L1 8.00  k6", "ab-L1 9.00  k2"]
    merged.results = merged.results[:3]  # fewer than 2 x EXTREMES: each image once
    assert [t.key.split()[-1] for t in best_and_worst(merged)] == ["k1", "k0", "k2"]


@pytest.mark.slow
def test_two_gloo_processes_give_the_same_averages_as_one(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    tiny_export(run_dir, sample_shards)
    common = ["-m", "pix2pix_dist.evaluate", str(run_dir), "--split", "train", "--full-res",
              "--batch-size", "2"]
    one = run_python([*common, "--name", "one"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      *common, "--name", "two"], timeout=300)  # standalone: a free port
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((run_dir / "eval" / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["images"] == b["images"] == find_shards(sample_shards, "train").total >= 5
    assert [r["key"] for r in a["per_image"]] == [r["key"] for r in b["per_image"]]
    assert len({r["key"] for r in b["per_image"]}) == b["images"]  # none twice
    for res in ("train_res", "full_res"):
        for row in ("model", "gray"):
            for k, v in a["metrics"][res][row].items():
                assert b["metrics"][res][row][k] == pytest.approx(v, abs=1e-4), (res, row, k)
    assert (run_dir / "eval" / "two-gallery.png").is_file()


# --- exports -----------------------------------------------------------------------------------

def _write_raw(path: Path, tensors: dict, model: object, inference: object | None = None) -> Path:
    meta = {MODEL_KEY: model if isinstance(model, str) else json.dumps(model)}
    if inference is not None:
        meta[INFERENCE_KEY] = inference if isinstance(inference, str) else json.dumps(inference)
    save_file(tensors, str(path), metadata=meta)
    return path


GOOD_MODEL = {"in_channels": 1, "out_channels": 2, "num_downs": 6, "ngf": 8, "norm": "batch",
              "dropout": True}


@pytest.mark.parametrize("model, inference, message", [
    ("{not json", None, "unreadable metadata"),
    ("[1, 2]", None, "malformed metadata"),
    ({**GOOD_MODEL, "ngf": 10**9}, None, "ngf"),
    ({**GOOD_MODEL, "num_downs": "6"}, None, "num_downs"),
    ({**GOOD_MODEL, "evil": 1}, None, "exactly the keys"),
    ({**GOOD_MODEL, "norm": "__import__('os')"}, None, "norm"),
    (GOOD_MODEL, {"norm_mode": "train"}, "norm_mode"),
    (GOOD_MODEL, {"crop_size": 100}, "crop_size"),
    (GOOD_MODEL, {"crop_size": 64, "load_size": 32}, "load_size"),  # below the crop
    (GOOD_MODEL, {"crop_size": 64, "shell": "rm"}, "unknown inference metadata"),
    ({**GOOD_MODEL, "ngf": 16}, None, "tensor"),  # metadata disagrees with the weights' shapes
])
def test_crafted_export_metadata_is_one_line_export_error(tmp_path, model, inference, message):
    tensors = UNetGenerator(num_downs=6, ngf=8).state_dict()
    path = _write_raw(tmp_path / "g.safetensors", tensors, model, inference)
    with pytest.raises(ExportError, match=message) as info:
        load_export(path)
    assert "\n" not in str(info.value)


def test_non_finite_generators_are_neither_exported_nor_loaded(tmp_path, capsys):
    generator = UNetGenerator(num_downs=6, ngf=8)
    with torch.no_grad():
        generator.model.down[0].weight[0, 0, 0, 0] = float("nan")
    cfg = build_config(None, overrides=TINY)
    with pytest.raises(ExportError, match="non-finite"):
        export_generator(generator, tmp_path / "refused.safetensors", generator_meta(cfg, 1))
    assert not list(tmp_path.iterdir())
    path = _write_raw(tmp_path / "nan.safetensors", generator.state_dict(), GOOD_MODEL,
                      {"crop_size": 64})
    with pytest.raises(ExportError, match="non-finite"):
        load_export(path)
    for main, args in ((evaluate_main, [str(path), "--shards", "x"]),
                       (colorize_main, [str(REPO / "README.md"), "--generator", str(path)])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "non-finite" in err, err


def test_exports_without_inference_metadata_load_with_defaults(tmp_path):
    path = _write_raw(tmp_path / "old.safetensors", UNetGenerator(num_downs=6, ngf=8).state_dict(),
                      GOOD_MODEL)
    settings = load_export(path).settings
    assert settings == InferenceSettings(norm_mode="eval", resize="shorter_side", crop_size=64, step=0)


def test_an_export_of_the_old_syncbatch_name_loads_with_batchnorm(tmp_path):
    path = _write_raw(tmp_path / "old.safetensors", UNetGenerator(num_downs=6, ngf=8).state_dict(),
                      {**GOOD_MODEL, "norm": "syncbatch"}, {"crop_size": 64})
    generator = load_export(path).generator
    assert any(type(m) is torch.nn.BatchNorm2d for m in generator.modules())


def test_run_without_shards_is_a_one_line_error(tmp_path, capsys):
    export = tiny_export(tmp_path / "run", tmp_path / "missing")
    shutil.copy(export, tmp_path / "loose.safetensors")
    for args, message in (([str(tmp_path / "run")], "no val shards"),
                          ([str(tmp_path / "loose.safetensors")], "give --shards"),
                          ([str(tmp_path / "run"), "--name", "../../escape"], "--name"),
                          ([str(tmp_path / "run"), "--weights-dir", str(tmp_path / "typo")],
                           "--weights-dir"),
                          ([str(tmp_path / "run"), "--output", str(export)], "not a folder"),
                          ([str(tmp_path / "run"), "--output", str(export / "sub")], "Not a directory"),
                          ([str(tmp_path / "run"), "--split", "test"], "--split")):
        assert evaluate_main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    # Failing after setup leaves no empty folder it created (eval/, or a new --output tree).
    assert evaluate_main([str(tmp_path / "run"), "--output", str(tmp_path / "new" / "out")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loose.safetensors", "run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json",
                                                                    "generator.safetensors"]


def test_exception_messages_are_cut_to_their_first_non_blank_line():
    assert first_line(RuntimeError("\n  decoder failed\ndetails")) == "decoder failed"
    assert first_line(ValueError("")) == first_line(ValueError("  \n")) == "ValueError"


def test_frechet_distance_closed_form():
    a, b = np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])
    # means 1 and 3, sample variances 2 and 8: (1-3)^2 + 2 + 8 - 2*sqrt(2*8) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, abs=1e-9)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 1.0) == pytest.approx(4.0, abs=1e-6)  # shifted means only
    # fewer samples than dimensions (the nuclear-norm path) agrees with the textbook sqrtm form
    from scipy.linalg import sqrtm

    a, b = rng.normal(size=(5, 8)), rng.normal(size=(7, 8)) * 2 + 0.5
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    textbook = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(textbook, rel=1e-6)


def test_fid_is_computed_only_from_local_weights(sample_shards, tmp_path, capsys, one_thread):
    from torchvision.models import Inception3

    run_dir = tmp_path / "run"
    tiny_export(run_dir, sample_shards)
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)  # stand-in weights with the real architecture: the plumbing, not values
    torch.save(Inception3(aux_logits=True, transform_input=True, init_weights=False).state_dict(),
               weights / FID_WEIGHTS)
    assert evaluate_main([str(run_dir), "--weights-dir", str(weights), "--name", "fid"]) == 0
    fid = json.loads((run_dir / "eval" / "fid.json").read_text())["fid"]
    assert set(fid) == {"model", "gray"} and all(math.isfinite(v) and v > -1e-6 for v in fid.values())
    assert "FID: model" in capsys.readouterr().out

    assert evaluate_main([str(run_dir), "--weights-dir", str(tmp_path), "--name", "none"]) == 0
    assert json.loads((run_dir / "eval" / "none.json").read_text())["fid"] == NOT_COMPUTED
    (weights / FID_WEIGHTS).write_bytes(b"not weights")
    assert evaluate_main([str(run_dir), "--weights-dir", str(weights)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not torchvision's Inception v3 weights" in err


def test_lpips_is_computed_only_from_local_weights(sample_shards, tmp_path, capsys, one_thread):
    from torchvision.models import alexnet

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)  # stand-in weights with the real shapes: the plumbing and the formula
    torch.save(alexnet(weights=None).state_dict(), weights / LPIPS_FILES[0])
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(lins, weights / LPIPS_FILES[1])
    net = lpips_network(weights, torch.device("cpu"))
    rng = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 256, (2, 3, 64, 64), generator=rng, dtype=torch.uint8) for _ in range(2))
    d = net(x, y)
    assert d.shape == (2,) and bool((d > 0).all()) and torch.allclose(net(y, x), d)
    assert net(x, x).abs().max() < 1e-6
    doubled = Lpips(net.features, [2 * w for w in net.lins])  # linear in the layer weights
    assert torch.allclose(doubled(x, y), 2 * d)

    run_dir = tmp_path / "run"
    tiny_export(run_dir, sample_shards)
    assert evaluate_main([str(run_dir), "--weights-dir", str(weights), "--name", "lp"]) == 0
    report = json.loads((run_dir / "eval" / "lp.json").read_text())
    assert set(report["lpips"]) == {"model", "gray"} and report["fid"] == NOT_COMPUTED
    assert report["lpips"]["model"] == pytest.approx(
        np.mean([r["model"]["lpips"] for r in report["per_image"]]))
    assert "LPIPS: model" in capsys.readouterr().out
    (weights / LPIPS_FILES[1]).write_bytes(b"nope")
    assert evaluate_main([str(run_dir), "--weights-dir", str(weights)]) == 2
    assert "not AlexNet and LPIPS v0.1 weights" in capsys.readouterr().err


def test_training_eval_falls_back_to_train_images_without_a_val_split(sample_shards, tmp_path, capsys):
    shards = tmp_path / "train_only"
    shards.mkdir()
    for tar in find_shards(sample_shards, "train").shards:
        shutil.copy(tar.tar, shards / tar.tar.name)  # no manifest, no val-*.tar
    cfg = build_config(None, overrides=[*TINY, ("data.shards", str(shards)), ("eval.count", 3),
                                        ("eval.norm_mode", "batch")])  # batch mode updates BN stats
    evaluator = TrainingEval(find_splits(shards).for_eval(), cfg.eval.count,
                             generator_meta(cfg, 0), torch.device("cpu"))
    assert "has no val split" in capsys.readouterr().err and len(evaluator.samples) == 3
    torch.manual_seed(0)
    generator = build_generator(generator_meta(cfg, 0)["model"])
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    scalars = evaluator(generator.train())
    assert {"eval/ab_l1", "eval/dcf", "eval/gray_ab_l1"} <= set(scalars)
    assert all(math.isfinite(v) for v in scalars.values())
    assert generator.training and all(torch.equal(before[k], v) for k, v in generator.state_dict().items())
