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
