"""Training under torchrun: 2 CPU processes (gloo) must follow the 1-process loss curve
with the same global batch. Tolerance: 1e-3 relative (only the order of float sums differs)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import logged_losses, tiny_clip_recipe

TOLERANCE = 1e-3


def _train(tmp_path, kind: str, recipe: dict, out: str, processes: int):
    path = tmp_path / f"{out}.json"
    path.write_text(json.dumps(recipe))
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    command = [*launcher, "-m", "vlm.cli", "train", kind, "--recipe", str(path), "--out", str(tmp_path / out)]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    return logged_losses(tmp_path / out)


def test_clip_with_two_processes_matches_one(tmp_path, shapes_dataset):
    recipe = tiny_clip_recipe(shapes_dataset, epochs=2)
    one = _train(tmp_path, "clip", recipe, "one", 1)
    two = _train(tmp_path, "clip", recipe, "two", 2)
    assert len(one) == len(two) == 8
    assert two == pytest.approx(one, rel=TOLERANCE)
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_llava_trains_with_two_processes(tmp_path, shapes_dataset, pretrained_dirs):
    clip_dir, lm_dir = pretrained_dirs
    train = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "workers": 0, "log_every": 1}
    recipe = {
        "vision": clip_dir,
        "lm": lm_dir,
        "max_length": 128,
        "val_fraction": 0.0,
        "stage1": {"data": str(shapes_dataset), "train": train},
        "stage2": {"data": str(shapes_dataset), "train": train},
    }
    one = _train(tmp_path, "llava", recipe, "one", 1)
    two = _train(tmp_path, "llava", recipe, "two", 2)
    assert two == pytest.approx(one, rel=TOLERANCE)
    assert (tmp_path / "two" / "phases" / "stage1" / "model.safetensors").is_file() and (
        tmp_path / "two" / "model.safetensors"
    ).is_file()
