"""`python -m hybridgl segment` as a user runs it, with the tiny models loaded through the real paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_models import GOLDEN_DIR, PERMISSIVE, TINY_CLIP_DIR, save_tiny_sam

ROOT = Path(__file__).resolve().parents[1]
IMAGE = GOLDEN_DIR / "p00_cup_left_of_plate" / "image.png"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hybridgl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def permissive_sets() -> list[str]:
    out = []
    for key, value in PERMISSIVE.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def test_segment_with_tiny_sam_checkpoint_writes_mask_overlay_json(tmp_path):
    checkpoint = save_tiny_sam(tmp_path / "tiny_sam.pth")
    result = run_cli("segment", str(IMAGE), "The cup to the left of the plate", "--out", "mask.png",
                     "--overlay", "overlay.png", "--json", "result.json", "--clip", str(TINY_CLIP_DIR),
                     "--sam", "tiny_models:build_tiny_sam", "--sam-checkpoint", str(checkpoint),
                     "--parser", "rules", "--device", "cpu", *permissive_sets(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    image = Image.open(IMAGE)
    assert mask.shape == (image.height, image.width)
    assert set(np.unique(mask)) <= {0, 255} and (mask == 255).any()
    overlay = Image.open(tmp_path / "overlay.png")
    assert overlay.size == image.size and overlay.mode == "RGB"
    assert not np.array_equal(np.asarray(overlay), np.asarray(image.convert("RGB")))
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["parse"]["noun_phrase"] == "the cup" and summary["parse"]["relation"] == "left"
    assert summary["parse"]["parser"] == "rules"
    assert 0 <= summary["score"] <= 1 and summary["index"] == summary["ranking"][0]["index"]
    assert summary["mask_area"] == int((mask == 255).sum())
    assert summary["proposals"] > 1


def test_segment_with_injected_proposals_matches_the_library(tmp_path, tiny_model_nosam):
    data = np.load(GOLDEN_DIR / "p00_cup_left_of_plate" / "case.npz")
    np.save(tmp_path / "masks.npy", data["masks"])
    result = run_cli("segment", str(IMAGE), "the cup to the left of the plate", "--out", "m.png",
                     "--json", "r.json", "--clip", str(TINY_CLIP_DIR), "--sam", "none", "--proposals",
                     "masks.npy", "--parser", "rules", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r.json").read_text())
    seg = tiny_model_nosam.segment(tiny_model_nosam.prepare(Image.open(IMAGE), proposals=data["masks"]),
                                   "the cup to the left of the plate")
    assert summary["index"] == seg.index
    assert summary["score"] == pytest.approx(seg.score, abs=1e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")) > 0, seg.mask)


@pytest.mark.parametrize("args, message", [
    (["missing.png", "the cup"], "image not found: missing.png"),
    (["not_an_image.png", "the cup"], "not a readable image"),
    ([str(IMAGE), "   "], "empty expression"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, args, message):
    (tmp_path / "not_an_image.png").write_text("hello")
    result = run_cli("segment", *args, "--out", "m.png", "--clip", str(TINY_CLIP_DIR), "--sam", "none",
                     cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.png").exists()


def test_bad_config_value_is_a_usage_error(tmp_path):
    result = run_cli("segment", str(IMAGE), "the cup", "--out", "m.png", "--clip", str(TINY_CLIP_DIR),
                     "--sam", "none", "--set", "fusion_mode=\"nope\"", cwd=tmp_path)
    assert result.returncode == 2 and "bad config" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("setup, extra, message", [
    (lambda d: np.savez(d / "p.npz", other=np.zeros((1, 4, 4), bool)), ["--proposals", "p.npz"],
     "has no 'masks' array"),
    (lambda d: (d / "cfg").mkdir(), ["--config", "cfg"], "config file"),
    (lambda d: (d / "p.npy").write_bytes(b""), ["--proposals", "p.npy"], "not a readable proposals file: p.npy"),
    (lambda d: (d / "p.npz").write_bytes(b"PK\x03\x04 torn"), ["--proposals", "p.npz"],
     "not a readable proposals file: p.npz"),
    (lambda d: (d / "p.npy").write_text("hello"), ["--proposals", "p.npy"], "not a readable proposals file: p.npy"),
])
def test_bad_proposals_or_config_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, setup, extra, message):
    """In-process: these used to end in a KeyError / IsADirectoryError / EOFError / BadZipFile traceback."""
    from hybridgl.cli import main

    setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["segment", str(IMAGE), "the cup", "--out", "m.png", "--clip", str(TINY_CLIP_DIR), "--sam", "none",
               "--parser", "rules", "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1], err
    assert not (tmp_path / "m.png").exists()


def test_overlay_works_with_pillow_10_0_whose_default_font_takes_no_size(monkeypatch):
    """requirements.txt allows pillow>=10, but `ImageFont.load_default(size=...)` exists only from 10.1."""
    from PIL import ImageFont

    from hybridgl import visualize

    real = ImageFont.load_default

    def pillow_10_0_load_default(**kwargs):
        if kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return real()

    monkeypatch.setattr(visualize.ImageFont, "load_default", pillow_10_0_load_default)
    image = np.full((40, 60, 3), 100, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[5:20, 5:30] = True
    picture = visualize.overlay(image, mask, "the cup", 0.8, [~mask])
    assert picture.size == (60, 40) and not np.array_equal(np.asarray(picture), image)


def test_evaluate_refuses_a_bad_config_value_before_reading_the_dataset(tmp_path, capsys, monkeypatch):
    """`hybridgl evaluate --set k1=0` read the dataset (minutes for a large split) before the config
    was built with the model; a missing dataset was the error reported instead of the bad value."""
    from hybridgl import cli
    from hybridgl.evaluation import datasets

    def no_reading(*args, **kwargs):
        raise AssertionError("the dataset was read before the config was checked")

    monkeypatch.setattr(datasets, "load_dataset", no_reading)
    status = cli.main(["evaluate", "--dataset", "refcoco", "--split", "val", "--data-root", str(tmp_path / "absent"),
                       "--out", str(tmp_path / "run"), "--set", "k1=0"])
    err = capsys.readouterr().err
    assert status == 2 and "k1 and k2 must be at least 1" in err, err
    assert "absent" not in err and "Traceback" not in err
