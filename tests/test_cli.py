import json
import subprocess
import sys


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


def test_every_shipped_recipe_loads_into_its_recipe_class():
    from vlm.train.clip import ClipRecipe
    from vlm.train.flamingo import FlamingoRecipe
    from vlm.train.llava import LlavaRecipe
    from vlm.train.lm import LmRecipe
    from vlm.train.recipes import load_recipe, recipe_names

    classes = {"clip": ClipRecipe, "lm": LmRecipe, "llava": LlavaRecipe, "flamingo": FlamingoRecipe}
    names = {kind: recipe_names(kind) for kind in classes}
    assert "llava-easyvqa-anneal" in names["llava"] and "flamingo-easyvqa-pairs" in names["flamingo"]
    for kind, cls in classes.items():
        for name in names[kind]:
            recipe, data = load_recipe(cls, name, kind)  # unknown keys (a typo) raise VlmError
            assert isinstance(recipe, cls) and data


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
    assert main(["train", "clip", "--recipe", "clip-easyvqa", "--out", str(tmp_path / "r"), "--init", "clip-easyvqa"]) == 2
    assert "--init continues llava and flamingo" in capsys.readouterr().err
    assert main(["train", "flamingo", "--recipe", "flamingo-easyvqa", "--out", str(tmp_path / "r"), "--stage", "2"]) == 2
    assert "--stage applies to train llava only" in capsys.readouterr().err
    assert main(["eval", "vqa", "--model", "flamingo-easyvqa", "--data", "easyvqa:test", "--shots", "2", "--shot-data", "easyvqa:test"]) == 2
    assert "must not be the test split" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_index_build_refuses_a_bad_spec_before_embedding_anything(tiny_clip_dir, shapes_dataset, tmp_path, capsys, monkeypatch):
    import retrieval.index

    monkeypatch.setattr(retrieval.index, "embed_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("embedded")))
    folder = shapes_dataset.parent / "images"
    assert main(["index", "build", str(folder), "--out", str(tmp_path / "idx"), "--model", tiny_clip_dir, "--index-spec", "Bogus"]) == 2
    assert "not a FAISS index_factory string" in capsys.readouterr().err


def test_index_build_of_webdataset_shards_says_how(tmp_path, capsys):
    from vlm.data import webdataset

    webdataset.write_shards([(b"x", "png", "a red circle")], tmp_path / "shards")
    assert main(["index", "build", str(tmp_path / "shards"), "--out", str(tmp_path / "idx")]) == 2
    assert "vlmstack embed" in capsys.readouterr().err
