import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import draw_shape, one_error_line, tiny_clip_recipe, write_checkpoint, write_json
from vlm.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "vlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_unknown_model_is_one_line_exit_2_no_traceback():
    result = _run("eval", "clip", "--model", "no-such-model", "--data", "easyvqa:test")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_data_file_is_exit_2(tiny_clip, tmp_path, capsys):
    tiny_clip.save(tmp_path / "m")
    assert main(["eval", "clip", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_unknown_recipe_lists_the_named_ones(tmp_path, capsys):
    assert main(["train", "clip", "--recipe", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "clip-easyvqa" in capsys.readouterr().err


def test_every_shipped_recipe_is_a_pipeline_of_its_kind():
    from vlm.train.recipes import load_pipeline, recipe_class, recipe_names

    names = {kind: recipe_names(kind) for kind in ("clip", "lm", "llava", "flamingo")}
    assert names["llava"] == ["llava-easyvqa"] and names["flamingo"] == ["flamingo-easyvqa"]
    for kind, kind_names in names.items():
        for name in kind_names:
            pipeline = load_pipeline(name, kind)  # unknown keys (a typo) raise VlmError
            assert pipeline.phases[-1].kind == kind and isinstance(pipeline.phases[-1].recipe, recipe_class(kind))


def test_eval_prints_the_contract_json_last(tiny_clip, tmp_path, shapes_dataset, capsys):
    tiny_clip.save(tmp_path / "m")
    assert main(["eval", "clip", "--model", str(tmp_path / "m"), "--data", str(shapes_dataset)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    assert list(metrics) == ["zeroshot_top1", "t2i_r1", "t2i_r5", "i2t_r1", "n"]
    assert metrics["n"] == 48


def test_eval_clip_limit_scores_only_the_first_examples(tiny_clip, tmp_path, shapes_dataset, capsys):
    tiny_clip.save(tmp_path / "m")
    assert main(["eval", "clip", "--model", str(tmp_path / "m"), "--data", str(shapes_dataset), "--limit", "10"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 10


def test_eval_clip_with_no_readable_image_is_a_user_error(tiny_clip, tmp_path, capsys):
    tiny_clip.save(tmp_path / "m")
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    (tmp_path / "data.jsonl").write_text('{"image": "bad.png", "caption": "a red circle"}\n')
    assert main(["eval", "clip", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data.jsonl")]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    assert (
        main(["train", "flamingo", "--recipe", "flamingo-easyvqa", "--out", str(tmp_path / "r"), "--phase", "x"]) == 2
    )
    assert "has no phase 'x'; its phases: lm, base, pairs" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "vqa",
                "--model",
                "flamingo-easyvqa",
                "--data",
                "easyvqa:test",
                "--shots",
                "2",
                "--shot-data",
                "easyvqa:test",
            ]
        )
        == 2
    )
    assert "must not be the test split" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_index_build_refuses_a_bad_spec_before_embedding_anything(
    tiny_clip_dir, shapes_dataset, tmp_path, capsys, monkeypatch
):
    import retrieval.index

    monkeypatch.setattr(
        retrieval.index, "embed_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("embedded"))
    )
    folder = shapes_dataset.parent / "images"
    assert (
        main(
            [
                "index",
                "build",
                str(folder),
                "--out",
                str(tmp_path / "idx"),
                "--model",
                tiny_clip_dir,
                "--index-spec",
                "Bogus",
            ]
        )
        == 2
    )
    assert "not a FAISS index_factory string" in capsys.readouterr().err


def test_index_build_of_webdataset_shards_says_how(tmp_path, capsys):
    from vlm.data import webdataset

    webdataset.write_shards([(b"x", "png", "a red circle")], tmp_path / "shards")
    assert main(["index", "build", str(tmp_path / "shards"), "--out", str(tmp_path / "idx")]) == 2
    assert "vlmstack embed" in capsys.readouterr().err


def _exit_code(argv) -> int:
    """main(argv)'s exit code, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


NUMERIC_OPTIONS = {
    "embed --shard-size 0": (["embed", "src", "--out", "o", "--shard-size", "0"], "--shard-size"),
    "embed --shard-size -1": (["embed", "src", "--out", "o", "--shard-size", "-1"], "--shard-size"),
    "caption --batch-size 0": (["caption", "dir", "--out", "c.jsonl", "--batch-size", "0"], "--batch-size"),
    "caption --max-new-tokens 0": (["caption", "dir", "--out", "c.jsonl", "--max-new-tokens", "0"], "--max-new-tokens"),
    "caption --max-new-tokens 100000": (
        ["caption", "dir", "--out", "c.jsonl", "--max-new-tokens", "100000"],
        "--max-new-tokens",
    ),
    "caption --batch-size x": (["caption", "dir", "--out", "c.jsonl", "--batch-size", "x"], "--batch-size"),
    "app --port 99999": (["app", "--port", "99999"], "--port"),
    "app --port 0": (["app", "--port", "0"], "--port"),
    "search -k 0": (["search", "idx", "query", "-k", "0"], "-k"),
    "search --min-score 5": (["search", "idx", "query", "--min-score", "5"], "--min-score"),
    "search --min-score nan": (["search", "idx", "query", "--min-score", "nan"], "--min-score"),
    "index build --workers -1": (["index", "build", "dir", "--out", "idx", "--workers", "-1"], "--workers"),
    "index update --batch-size 0": (["index", "update", "idx", "--batch-size", "0"], "--batch-size"),
    "eval --batch-size 0": (["eval", "clip", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
    "eval --limit 0": (["eval", "vqa", "--model", "m", "--data", "d", "--limit", "0"], "--limit"),
}


@pytest.mark.parametrize("case", list(NUMERIC_OPTIONS))
def test_an_out_of_range_number_is_one_line_naming_the_option_exit_2(case, capsys, tmp_path, monkeypatch):
    argv, option = NUMERIC_OPTIONS[case]
    monkeypatch.chdir(tmp_path)  # nothing the command could write lands in the repo
    assert _exit_code(argv) == 2
    assert f"argument {option}" in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def _bad_copy(source, tmp_path, *, config=None, weights=None):
    directory = tmp_path / "bad-model"
    shutil.copytree(source, directory)
    if config is not None:
        (directory / "config.json").write_text(config)
    if weights is not None:
        (directory / "model.safetensors").write_bytes(weights)
    return directory


def _clip_with_embed_dim(source, value):
    config = json.loads((Path(source) / "config.json").read_text())
    config["model_cfg"]["embed_dim"] = value
    return json.dumps(config)


BAD_CLIP_DIRECTORIES = {
    "config []": lambda d: {"config": "[]"},
    'config {"kind": "clip"}': lambda d: {"config": '{"kind": "clip"}'},
    "model_cfg a string": lambda d: {"config": '{"kind": "clip", "model_cfg": "ViT-B-32"}'},
    "negative embed_dim": lambda d: {"config": _clip_with_embed_dim(d, -5)},
    "random safetensors": lambda d: {"weights": os.urandom(3000)},
}


@pytest.mark.parametrize("case", list(BAD_CLIP_DIRECTORIES))
def test_eval_clip_on_a_damaged_model_directory_is_one_line_exit_2(
    case, tiny_clip_dir, shapes_dataset, tmp_path, capsys
):
    directory = _bad_copy(tiny_clip_dir, tmp_path, **BAD_CLIP_DIRECTORIES[case](tiny_clip_dir))
    assert main(["eval", "clip", "--model", str(directory), "--data", str(shapes_dataset)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"vlmstack: error: {directory}/")


def _llava_with(source, **changes):
    config = json.loads((Path(source) / "config.json").read_text())
    return json.dumps({**config, **changes})


BAD_LLAVA_DIRECTORIES = {
    "config []": lambda d: {"config": "[]"},
    "no lm": lambda d: {
        "config": json.dumps({k: v for k, v in json.loads((Path(d) / "config.json").read_text()).items() if k != "lm"})
    },
    "max_length negative": lambda d: {"config": _llava_with(d, max_length=-1)},
    "projector unknown": lambda d: {"config": _llava_with(d, projector="bogus")},
    "random safetensors": lambda d: {"weights": os.urandom(3000)},
}


@pytest.mark.parametrize("case", list(BAD_LLAVA_DIRECTORIES))
def test_eval_vqa_on_a_damaged_model_directory_is_one_line_exit_2(case, tiny_llava_dir, tmp_path, capsys):
    directory = _bad_copy(tiny_llava_dir, tmp_path, **BAD_LLAVA_DIRECTORIES[case](tiny_llava_dir))
    draw_shape("red", "circle").save(tmp_path / "a.png")
    (tmp_path / "vqa.jsonl").write_text('{"image": "a.png", "question": "what color is the shape?", "answer": "red"}\n')
    assert main(["eval", "vqa", "--model", str(directory), "--data", str(tmp_path / "vqa.jsonl")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"vlmstack: error: {directory}")


def test_train_resume_on_a_pickled_checkpoint_is_one_line_exit_2(shapes_dataset, tmp_path, capsys):
    recipe = write_json(tmp_path / "recipe.json", tiny_clip_recipe(shapes_dataset, epochs=1))
    run = tmp_path / "run"
    write_checkpoint(run, {"step": 1, "note": argparse.Namespace(pickled=True)})  # any class pickles
    write_json(run / "pipeline.json", {"recipe": json.loads(Path(recipe).read_text())})  # begun by this recipe
    assert main(["train", "clip", "--recipe", recipe, "--out", str(run), "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint.pt: holds pickled objects that weights_only loading refuses" in line
