"""The training loop every recipe uses (vlm/train/trainer.py): the learning-rate schedule,
seeded batches, bf16, and runs that resume where they stopped or refuse to be overwritten.
Whole runs are driven through the CLIP recipe, the quickest to train."""

import json

import pytest
import torch

from tests.helpers import logged_losses, tiny_clip_recipe, write_json
from vlm.errors import VlmError
from vlm.train import trainer as trainer_module
from vlm.train.pipeline import train_pipeline
from vlm.train.trainer import epoch_batches, lr_factor


def _recipe(tmp_path, data, **train) -> str:
    return write_json(tmp_path / "recipe.json", tiny_clip_recipe(data, **train))


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path, shapes_dataset):
    recipe = _recipe(tmp_path, shapes_dataset, epochs=1)
    train_pipeline("clip", recipe, tmp_path / "run")
    with pytest.raises(VlmError, match="--resume"):
        train_pipeline("clip", recipe, tmp_path / "run")


def test_resume_mid_run_matches_an_uninterrupted_run(tmp_path, shapes_dataset, monkeypatch):
    recipe = _recipe(tmp_path, shapes_dataset, epochs=2, checkpoint_every=3)
    full = tmp_path / "full"
    train_pipeline("clip", recipe, full)

    crashed = tmp_path / "crashed"
    original = trainer_module.Trainer._train_step

    def crash_at_step_7(self, batch):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_pipeline("clip", recipe, crashed)
    monkeypatch.setattr(trainer_module.Trainer, "_train_step", original)
    assert json.loads((crashed / "checkpoint.json").read_text())["step"] == 6  # mid-epoch checkpoint
    train_pipeline("clip", recipe, crashed, resume=True)
    assert logged_losses(crashed) == pytest.approx(logged_losses(full), rel=1e-4)


def test_half_written_checkpoint_is_refused(tmp_path, shapes_dataset):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, shapes_dataset, epochs=1)
    train_pipeline("clip", recipe, run)
    (run / "model_card.json").unlink()  # as if stopped before the end: resume loads the checkpoint
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(VlmError, match="checksum"):
        train_pipeline("clip", recipe, run, resume=True)


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_epoch_batches_are_seeded_and_differ_by_epoch():
    assert epoch_batches(50, 8, seed=1, epoch=0) == epoch_batches(50, 8, seed=1, epoch=0)
    assert epoch_batches(50, 8, seed=1, epoch=0) != epoch_batches(50, 8, seed=1, epoch=1)
    assert len(epoch_batches(50, 8, seed=1, epoch=0)) == 6


def test_length_grouping_keeps_every_example_once_and_cuts_padding():
    lengths = [(i * 37) % 100 + 1 for i in range(1000)]
    grouped = epoch_batches(1000, 10, seed=0, epoch=0, lengths=lengths)
    plain = epoch_batches(1000, 10, seed=0, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(1000))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < 0.2 * padding(plain)
    assert grouped != epoch_batches(1000, 10, seed=0, epoch=1, lengths=lengths)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_is_taken_only_where_the_cpu_computes_bf16_natively(tmp_path, monkeypatch, caplog, native):
    monkeypatch.setattr(trainer_module, "native_bf16", lambda: native)
    layer = torch.nn.Linear(4, 1)
    seen = []

    class Objective(torch.nn.Module):
        def forward(self, batch):
            out = layer(batch["x"])
            seen.append(out.dtype)
            return out.float().pow(2).mean()

    data = [torch.randn(4) for _ in range(8)]
    trainer = trainer_module.Trainer(
        model=layer,
        groups=trainer_module.param_groups(layer, 0.0),
        config=trainer_module.TrainConfig(epochs=1, batch_size=4, bf16=True, workers=0),
        run_dir=tmp_path / "run",
        dataset=data,
        collate=lambda xs: {"x": torch.stack(xs), "size": len(xs), "skipped": []},
        objective=Objective(),
    )
    trainer.fit()
    assert seen == [torch.bfloat16 if native else torch.float32] * 2
    assert ("no native bfloat16" in caplog.text) is not native
