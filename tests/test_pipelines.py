"""A recipe is a whole pipeline (vlm/train/recipes.py, vlm/train/pipeline.py): every
shipped one resolves and runs a step per phase; phases inherit settings and continue the
model before them; runs resume per phase; bad recipes and changed ones are refused."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import one_error_line, tiny_clip_recipe, write_json
from vlm.cli import main
from vlm.data import easyvqa
from vlm.errors import VlmError
from vlm.train import trainer as trainer_module
from vlm.train.pipeline import train_pipeline
from vlm.train.recipes import load_pipeline, recipe_names
from vlm.train.trainer import TrainConfig, Trainer

# A trial run: one step of 4 examples per phase, few of Flamingo's generated sequences.
TRIAL = {"train": {"max_steps": 1, "batch_size": 4, "workers": 0}, "mix": {"fewshot_sequences": 4, "pair_questions": 4}}
SHIPPED = [(kind, name) for kind in ("clip", "lm", "llava", "flamingo") for name in recipe_names(kind)]


@pytest.fixture
def small_easyvqa(monkeypatch):
    """easyvqa:train (and :test) cut to their first 24 images and those images' questions."""
    full = easyvqa._raw

    def first_images(split: str):
        questions, answers, ids, paths = full(split)
        keep = set(sorted(paths)[:24])
        rows = [(q, a, i) for q, a, i in zip(questions, answers, ids) if i in keep]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], {i: paths[i] for i in sorted(keep)}

    monkeypatch.setattr(easyvqa, "_raw", first_images)
    easyvqa.images.cache_clear()
    yield
    easyvqa.images.cache_clear()


@pytest.mark.parametrize("kind, name", SHIPPED)
def test_every_shipped_pipeline_runs_one_step_per_phase(kind, name, small_easyvqa, tmp_path):
    out = tmp_path / name
    train_pipeline(kind, name, out, overrides=TRIAL)
    pipeline = load_pipeline(name, kind, overrides=TRIAL)
    phase_dirs = [out / "phases" / p.name for p in pipeline.phases[:-1]] + [out]
    for directory in phase_dirs:
        assert json.loads((directory / "checkpoint.json").read_text())["step"] == 1, directory
    card = json.loads((out / "model_card.json").read_text())
    assert card["pipeline"] == pipeline.resolved() and card["pipeline"]["schema_version"] == 3
    assert card["pipeline_sha256"] == pipeline.sha256() and card["phase"] == pipeline.phases[-1].name
    assert card["command"] == f"vlmstack train {kind} --recipe {name} --out {out}"
    assert card["commit"] and list(card["pipeline_train_seconds"]) == [p.name for p in pipeline.phases] + ["total"]


def test_the_shipped_vqa_pipelines_are_the_chains_that_built_the_shipped_models():
    llava = load_pipeline("llava-easyvqa", "llava")
    assert [p.name for p in llava.phases] == ["lm", "stage1", "stage2", "skew", "anneal"]
    anneal = llava.phase("anneal").recipe
    assert (anneal.stage, anneal.train.lr, anneal.train.seed, anneal.train.epochs) == (2, 0.0002, 1, 1)
    assert anneal.mix == llava.phase("skew").recipe.mix and anneal.mix.recall_attributes == ("color",)
    assert llava.phase("stage1").recipe.stage == 1 and llava.phase("lm").lm_recipe == "lm-easyvqa"
    flamingo = load_pipeline("flamingo-easyvqa", "flamingo")
    assert [p.name for p in flamingo.phases] == [
        *("lm", "base", "pairs", "shapes"),
        *(f"augment-{i}" for i in range(1, 5)),
    ]
    augment = [flamingo.phase(f"augment-{i}").recipe for i in range(1, 5)]
    assert all(r == augment[0] for r in augment) and augment[0].train.seed == 3
    shapes = flamingo.phase("shapes").recipe
    assert (shapes.mix.yes_no_per_image, shapes.mix.pair_questions, shapes.train.lr) == (24, 16000, 0.0005)
    assert shapes.mix.yes_no_skew_attributes == ("color",)  # inherited from "pairs"
    assert flamingo.phase("base").recipe.augment is None and augment[0].augment.zoom_out == 0.5


def _two_phases(tmp_path, data, **second) -> str:
    """A CLIP pipeline of phases "a" and "b" (b's own settings `second`), two steps each."""
    recipe = tiny_clip_recipe(data, epochs=1, max_steps=2, checkpoint_every=1)
    return write_json(
        tmp_path / "pipeline.json", {"schema_version": 3, **recipe, "phases": [{"name": "a"}, {"name": "b", **second}]}
    )


def test_a_phase_continues_the_model_of_the_phase_before(tmp_path, shapes_dataset):
    recipe = _two_phases(tmp_path, shapes_dataset, train={"lr": 1e-12})  # b barely moves the weights
    train_pipeline("clip", recipe, tmp_path / "run")
    a = load_file(str(tmp_path / "run" / "phases" / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    b_settings = load_pipeline(recipe, "clip").phase("b").recipe.train
    assert (b_settings.lr, b_settings.batch_size, b_settings.max_steps) == (1e-12, 12, 2)  # the rest from a


def test_phase_runs_only_that_phase_and_needs_the_one_before(tmp_path, shapes_dataset, capsys):
    recipe = _two_phases(tmp_path, shapes_dataset)
    run = tmp_path / "run"
    assert main(["train", "clip", "--recipe", recipe, "--out", str(tmp_path / "fresh"), "--phase", "b"]) == 2
    assert "phase 'b' starts from phase 'a''s model" in one_error_line(capsys.readouterr().err)
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--phase", "a"]) == 0
    assert (run / "phases" / "a" / "model_card.json").is_file() and not (run / "model_card.json").exists()
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--phase", "b"]) == 0
    assert json.loads((run / "model_card.json").read_text())["phase"] == "b"


def test_resume_skips_finished_phases_and_continues_the_interrupted_one(tmp_path, shapes_dataset, monkeypatch):
    recipe = _two_phases(tmp_path, shapes_dataset)
    run = tmp_path / "run"
    original = trainer_module.Trainer._train_step
    steps, crash = [], [True]

    def record_steps_and_crash_in_b_at_its_second(self, batch):
        if crash[0] and self.run_dir == run and self.step == 1:
            raise KeyboardInterrupt
        steps.append((self.run_dir.name, self.step))
        return original(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "_train_step", record_steps_and_crash_in_b_at_its_second)
    with pytest.raises(KeyboardInterrupt):
        train_pipeline("clip", recipe, run)
    assert steps == [("a", 0), ("a", 1), ("run", 0)]
    a_card = (run / "phases" / "a" / "model_card.json").read_text()
    crash[0] = False
    train_pipeline("clip", recipe, run, resume=True)
    assert steps[3:] == [("run", 1)]  # a skipped; b from its checkpoint after its first step
    assert (run / "phases" / "a" / "model_card.json").read_text() == a_card
    assert json.loads((run / "model_card.json").read_text())["pipeline_train_seconds"].keys() == {"a", "b", "total"}


def test_resuming_after_the_recipe_changed_is_refused_in_one_line(tmp_path, shapes_dataset, capsys):
    recipe = _two_phases(tmp_path, shapes_dataset)
    run = tmp_path / "run"
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--phase", "a"]) == 0
    _two_phases(tmp_path, shapes_dataset, train={"lr": 0.001})
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the recipe changed since this run began: phase 'b' changed (train.lr 0.002 -> 0.001)" in line
    assert not (run / "model_card.json").exists()


def test_a_run_is_not_restarted_over_without_resume(tmp_path, shapes_dataset):
    recipe = _two_phases(tmp_path, shapes_dataset)
    train_pipeline("clip", recipe, tmp_path / "run")
    with pytest.raises(VlmError, match="already holds a run; pass --resume"):
        train_pipeline("clip", recipe, tmp_path / "run")


class _SquaredOutput(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(batch["x"]).pow(2).mean()


def _logged_run(run_dir: Path, max_steps: int | None) -> list[dict]:
    """metrics.csv of a 16-step run of a 1x1 linear model (warmup 2), without its times."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    config = TrainConfig(epochs=2, batch_size=2, warmup_steps=2, workers=0, log_every=1, max_steps=max_steps)
    Trainer(
        model=model,
        groups=[{"params": list(model.parameters())}],
        config=config,
        run_dir=run_dir,
        dataset=[float(i) for i in range(16)],
        collate=lambda xs: {"x": torch.tensor(xs)[:, None], "skipped": [], "size": len(xs)},
        objective=_SquaredOutput(model),
    ).fit()
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_max_steps_stops_early_on_the_full_runs_learning_rate_schedule(tmp_path):
    full, trial = _logged_run(tmp_path / "full", None), _logged_run(tmp_path / "trial", 5)
    assert len(full) == 16 and trial == full[:5]  # lr and loss of the first 5 steps alike


@pytest.mark.parametrize(
    "phase, message",
    [
        ({"name": "extra", "mixx": {}}, r"phase 'extra': unknown keys \['mixx'\]"),
        ({"name": "extra", "train": {"lrr": 1}}, r"phase 'extra' \[train\]: unknown keys \['lrr'\]"),
        ({"name": "extra", "model": {"projector": "linear"}}, "phase 'extra': 'model' builds the model"),
        ({"name": "extra", "stage": 3}, "phase 'extra': stage must be 1 or 2"),
        ({"name": "lm2", "lm_recipe": "lm-easyvqa", "train": {}}, "phase 'lm2': unknown keys"),
        ({"name": "a/b"}, "phase name 'a/b' must be"),
        ({"name": "stage1"}, "phase names repeat"),
    ],
)
def test_a_bad_phase_is_refused_naming_it(phase, message, tmp_path, capsys):
    recipe = json.loads(open_shipped("llava-easyvqa"))
    recipe["phases"].append(phase)
    path = write_json(tmp_path / "bad.json", recipe)
    with pytest.raises(VlmError, match=message):
        load_pipeline(path, "llava")
    assert main(["train", "llava", "--recipe", path, "--out", str(tmp_path / "run")]) == 2
    assert "bad.json" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lm": "phase:nope"}, "'phase:nope' names no lm_recipe phase before the first llava phase"),
        ({"lm": "lm-easyvqa"}, "phase 'lm' trains an LM no phase uses"),
        (
            {"init": "llava-easyvqa"},
            "\"init\": 'llava-easyvqa' continues a model that has its LM, so \"lm\": 'phase:lm'",
        ),
        ({"phases": []}, '"phases" must be a non-empty list'),
    ],
)
def test_lm_phases_must_be_used_and_named(change, message, tmp_path):
    path = write_json(tmp_path / "bad.json", {**json.loads(open_shipped("llava-easyvqa")), **change})
    with pytest.raises(VlmError, match=message):
        load_pipeline(path, "llava")


def open_shipped(name: str) -> str:
    from vlm.train.recipes import RECIPES_DIR

    return (RECIPES_DIR / f"{name}.json").read_text()


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"train": {"epochs": 99}}, r"unknown keys \['train'\]; a version 2 LLaVA recipe has only"),
        ({"data": "x.json"}, r"unknown keys \['data'\]"),
        ({"phases": []}, r"unknown keys \['phases'\]"),
        ({"stage2": {"val_fraction": 0.5}}, r"\[stage2\]: unknown keys \['val_fraction'\]; a version 2 LLaVA stage"),
        ({"stage1": {"stage": 2}}, r"\[stage1\]: unknown keys \['stage'\]"),
    ],
)
def test_a_version_2_llava_recipe_refuses_keys_it_did_not_have(recipe, message, tmp_path):
    path = write_json(tmp_path / "v2.json", {"schema_version": 2, "stage1": {}, "stage2": {}, **recipe})
    with pytest.raises(VlmError, match=message):
        load_pipeline(path, "llava")


def test_a_version_2_recipe_of_one_run_refuses_phases(tmp_path):
    path = write_json(tmp_path / "v2.json", {"schema_version": 2, "phases": [{"name": "clip"}]})
    with pytest.raises(VlmError, match='"phases" needs "schema_version": 3'):
        load_pipeline(path, "clip")
