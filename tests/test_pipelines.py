"""A recipe is a whole pipeline (vlm/train/recipes.py, vlm/train/pipeline.py): every
shipped one resolves and runs a step per phase; phases inherit settings and continue the
model before them; runs resume per phase; bad recipes and changed ones are refused."""

import csv
import hashlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import one_error_line, tiny_clip_recipe, write_json
from vlm.cli import main
from vlm.data import easyvqa
from vlm.errors import VlmError
from vlm.train import pipeline as pipeline_module
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


def repo_commit() -> str:
    """The vlmstack checkout's commit as `git describe` gives it ("-dirty" with changes)."""
    return subprocess.run(
        ["git", "describe", "--always", "--dirty", "--exclude=*"],
        cwd=Path(pipeline_module.__file__).parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.parametrize("kind, name", SHIPPED)
def test_every_shipped_pipeline_runs_one_step_per_phase(kind, name, small_easyvqa, tmp_path):
    out = tmp_path / f"{name} run"  # a space: the card's command quotes it
    train_pipeline(kind, name, out, overrides=TRIAL)
    pipeline = load_pipeline(name, kind, overrides=TRIAL)
    phase_dirs = [out / "phases" / p.name for p in pipeline.phases[:-1]] + [out]
    for directory in phase_dirs:
        assert json.loads((directory / "checkpoint.json").read_text())["step"] == 1, directory
    card = json.loads((out / "model_card.json").read_text())
    assert card["pipeline"] == pipeline.resolved() and card["pipeline"]["schema_version"] == 3
    assert card["pipeline_sha256"] == pipeline.sha256() and card["phase"] == pipeline.phases[-1].name
    assert shlex.split(card["command"]) == ["vlmstack", "train", kind, "--recipe", name, "--out", str(out)]
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", card["commit"]) and card["commit"] == repo_commit()
    assert "commits" not in card  # one commit trained every phase
    assert json.loads((out / "pipeline.json").read_text())["commit"] == card["commit"]
    assert list(card["pipeline_train_seconds"]) == [p.name for p in pipeline.phases] + ["total"]
    for phase, directory in zip(pipeline.phases, phase_dirs):  # each phase's card in one write
        phase_card = json.loads((directory / "model_card.json").read_text())
        assert (phase_card["phase"], phase_card["commit"]) == (phase.name, card["commit"]), directory


def test_the_shipped_vqa_pipelines_are_the_chains_that_built_the_shipped_models():
    llava = load_pipeline("llava-easyvqa", "llava")
    assert [p.name for p in llava.phases] == ["lm", "stage1", "copy", "stage2", "skew", "anneal"]
    copy, stage2 = llava.phase("copy").recipe, llava.phase("stage2").recipe
    assert (copy.stage, copy.mix.answer_types, copy.mix.yes_no_per_image) == (2, ("color", "shape"), 0)
    assert stage2.mix.answer_types == ("yes/no", "color", "shape") and stage2.mix.yes_no_per_image == 12
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


def _two_phases(tmp_path, data, steps: int = 1, **second) -> str:
    """A CLIP pipeline of phases "a" and "b" (b's own settings `second`), `steps` steps of
    4 images each."""
    recipe = tiny_clip_recipe(data, epochs=1, max_steps=steps, batch_size=4, checkpoint_every=1)
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
    assert (b_settings.lr, b_settings.batch_size, b_settings.max_steps) == (1e-12, 4, 1)  # the rest from a


def test_phase_runs_only_that_phase_and_needs_the_one_before(tmp_path, shapes_dataset, capsys):
    recipe = _two_phases(tmp_path, shapes_dataset)
    run = tmp_path / "run"
    assert main(["train", "clip", "--recipe", recipe, "--out", str(tmp_path / "fresh"), "--phase", "b"]) == 2
    assert "phase 'b' starts from phase 'a''s model" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "fresh").exists()  # refused before anything was written
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--phase", "a"]) == 0
    assert (run / "phases" / "a" / "model_card.json").is_file() and not (run / "model_card.json").exists()
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--phase", "b"]) == 0
    assert json.loads((run / "model_card.json").read_text())["phase"] == "b"


def test_resume_skips_finished_phases_and_continues_the_interrupted_one(tmp_path, shapes_dataset, monkeypatch):
    recipe = _two_phases(tmp_path, shapes_dataset, steps=2)
    run = tmp_path / "run"
    original = trainer_module.Trainer._train_step
    steps, crash = [], [True]
    commit = ["1111111"]  # the commit of the first attempt; the resume runs another
    monkeypatch.setattr(pipeline_module, "git_commit", lambda: commit[0])

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
    crash[0], commit[0] = False, "2222222"
    write_pipeline_card = pipeline_module._write_pipeline_card

    def stop_before_the_pipeline_card(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module, "_write_pipeline_card", stop_before_the_pipeline_card)
    with pytest.raises(KeyboardInterrupt):
        train_pipeline("clip", recipe, run, resume=True)
    assert steps[3:] == [("run", 1)]  # a skipped; b from its checkpoint after its first step
    assert (run / "phases" / "a" / "model_card.json").read_text() == a_card
    monkeypatch.setattr(pipeline_module, "_write_pipeline_card", write_pipeline_card)
    train_pipeline("clip", recipe, run, resume=True)  # b finished: only its card is completed
    assert steps[4:] == []
    card = json.loads((run / "model_card.json").read_text())
    assert card["pipeline_train_seconds"].keys() == {"a", "b", "total"} and card["phase"] == "b"
    assert card["pipeline"] == load_pipeline(recipe, "clip").resolved()
    assert (card["commit"], card["commits"]) == ("2222222", ["1111111", "2222222"])


def test_resuming_after_the_recipe_changed_is_refused_with_a_hint_that_finishes_the_run(
    tmp_path, shapes_dataset, capsys
):
    recipe = _two_phases(tmp_path, shapes_dataset)
    run = tmp_path / "run"
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--phase", "a"]) == 0
    _two_phases(tmp_path, shapes_dataset, train={"lr": 0.001})
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "the recipe changed since this run began: phase 'b' changed (train.lr 0.002 -> 0.001)" in line
    assert not (run / "model_card.json").exists()
    hint = f"finish the run with --recipe {run / 'recipe.json'} or choose another --out"
    assert line.endswith(hint)
    assert main(["train", "clip", "--recipe", str(run / "recipe.json"), "--out", str(run), "--resume"]) == 0
    assert json.loads((run / "model_card.json").read_text())["phase"] == "b"


def test_a_default_added_since_the_run_began_does_not_change_its_recipe(tmp_path, shapes_dataset):
    """A newer vlmstack resolves the recorded recipe to its own defaults too."""
    recipe = _two_phases(tmp_path, shapes_dataset)
    run = tmp_path / "run"
    train_pipeline("clip", recipe, run, phase="a")
    record = json.loads((run / "pipeline.json").read_text())
    for phase in record["pipeline"]["phases"]:  # as an older vlmstack, without min_lr_ratio, wrote it
        del phase["train"]["min_lr_ratio"]
    record["sha256"] = hashlib.sha256(json.dumps(record["pipeline"], sort_keys=True).encode()).hexdigest()
    (run / "pipeline.json").write_text(json.dumps(record))
    train_pipeline("clip", recipe, run, resume=True, phase="a")  # accepted; a finished, so skipped


def test_a_difference_names_a_setting_only_one_side_has():
    old, new = {"train": {"lr": 0.1}}, {"train": {"lr": 0.1, "max_steps": 2}}
    assert pipeline_module._difference(old, new) == "train.max_steps added (2)"
    assert pipeline_module._difference(new, old) == "train.max_steps removed (was 2)"


def test_a_first_attempt_that_trained_nothing_does_not_hold_out(tmp_path, shapes_dataset, capsys):
    """A bad data path fails before any step; the fixed recipe then starts over in OUT."""
    run = tmp_path / "run"
    recipe = _two_phases(tmp_path, tmp_path / "missing.jsonl")
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run)]) == 2
    assert "missing.jsonl" in one_error_line(capsys.readouterr().err)
    _two_phases(tmp_path, shapes_dataset)
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--phase", "a"]) == 0
    assert json.loads((run / "pipeline.json").read_text())["recipe"]["data"] == str(shapes_dataset)


@pytest.mark.parametrize("old_run", ["checkpoint.json", "model_card.json", "stage1/checkpoint.json"])
def test_resuming_a_run_from_before_pipelines_is_refused_in_one_line(old_run, tmp_path, shapes_dataset, capsys):
    run = tmp_path / "run"
    (run / old_run).parent.mkdir(parents=True)
    (run / old_run).write_text("{}")
    recipe = _two_phases(tmp_path, shapes_dataset)
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--resume"]) == 2
    assert "holds a run that predates pipelines (no pipeline.json)" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in run.iterdir()) == [Path(old_run).parts[0]]


@pytest.mark.parametrize("record", ["{", "[]", '{"sha256": "0"}'])
def test_a_damaged_run_record_is_refused_in_one_line(record, tmp_path, shapes_dataset, capsys):
    run = tmp_path / "run"
    (run / "phases" / "a").mkdir(parents=True)
    (run / "phases" / "a" / "model_card.json").write_text("{}")
    (run / "pipeline.json").write_text(record)
    recipe = _two_phases(tmp_path, shapes_dataset)
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--resume"]) == 2
    assert f"{run / 'pipeline.json'} is damaged" in one_error_line(capsys.readouterr().err)


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


def test_a_run_is_not_restarted_over_without_resume(tmp_path, shapes_dataset):
    recipe = _two_phases(tmp_path, shapes_dataset)
    train_pipeline("clip", recipe, tmp_path / "run", phase="a")
    with pytest.raises(VlmError, match="already holds a run; pass --resume"):
        train_pipeline("clip", recipe, tmp_path / "run")


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
