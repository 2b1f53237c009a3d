"""An imported OpenFlamingo whose LM ships its own Python code (as OpenFlamingo-3B's MPT,
config.json auto_map): the import copies that code into the model directory, and loading
the directory runs it only when trust_remote_code is given."""

import json

import pytest
import torch

from tests.helpers import one_error_line
from tests.test_openflamingo_import import build_reference, max_diff, run_import
from vlm.cli import main
from vlm.errors import VlmError
from vlm.flamingo import FlamingoModel
from vlm.load import load_vlm

CONFIGURATION = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom_lm"
"""
MODELING = """
from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""
CODE_FILES = ["configuration_tiny_custom.py", "modeling_tiny_custom.py"]


def make_custom_code_lm(directory) -> None:
    """Turn a saved Llama directory into an LM transformers knows only through its own code:
    model_type tiny_custom_lm, an auto_map to two files, one importing the other."""
    (directory / "configuration_tiny_custom.py").write_text(CONFIGURATION)
    (directory / "modeling_tiny_custom.py").write_text(MODELING)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="tiny_custom_lm",
        architectures=["TinyCustomLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomLlamaForCausalLM",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(the imported model directory, the open_flamingo reference) for a custom-code LM."""
    tmp = tmp_path_factory.mktemp("remote-code")
    tmp, ref = build_reference(tmp, untied=False)
    make_custom_code_lm(tmp / "lm")
    assert run_import(tmp, "2", "--out", str(tmp / "model"), "--trust-remote-code") == 0
    return tmp / "model", ref


def test_import_copies_the_lm_code_and_records_it(imported):
    directory, _ = imported
    assert all((directory / name).is_file() for name in CODE_FILES)
    assert json.loads((directory / "model_card.json").read_text())["lm_code"] == CODE_FILES
    lm = json.loads((directory / "config.json").read_text())["lm"]
    assert lm["model_type"] == "tiny_custom_lm" and "auto_map" in lm


def test_custom_code_model_is_refused_in_one_line_without_trust(imported):
    directory, _ = imported
    for load in (lambda: FlamingoModel.load(directory), lambda: load_vlm(str(directory))):
        with pytest.raises(VlmError) as error:
            load()
        message = str(error.value)
        assert "\n" not in message and "--trust-remote-code" in message and CODE_FILES[0] in message


def test_custom_code_model_loads_with_trust_and_matches_reference_logits(imported):
    directory, ref = imported
    ours = load_vlm(str(directory), trust_remote_code=True)
    assert type(ours.lm).__name__ == "TinyCustomLlamaForCausalLM"
    ids = torch.tensor([ours.tokenizer("<image>Question:what color is the shape? Short answer:")["input_ids"]])
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(vision_x=pixels[None, :, None], lang_x=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask, pixels=pixels).logits
    assert max_diff(got, expected, ref) <= 1e-4


def test_missing_code_file_is_refused_in_one_line(imported, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(imported[0], copy)
    (copy / "modeling_tiny_custom.py").unlink()
    with pytest.raises(VlmError, match="modeling_tiny_custom.py missing"):
        load_vlm(str(copy), trust_remote_code=True)


def test_cli_model_commands_take_trust_remote_code(imported, capsys):
    directory, _ = imported
    common = ["eval", "vqa", "--model", str(directory), "--data", "easyvqa:test", "--limit", "2"]
    assert main(common) == 2
    assert "--trust-remote-code" in one_error_line(capsys.readouterr().err)
    assert main([*common, "--trust-remote-code"]) == 0
    assert '"accuracy"' in capsys.readouterr().out.splitlines()[-1]


def test_caption_takes_trust_remote_code(imported, tmp_path, capsys):
    from tests.helpers import draw_shape

    directory, _ = imported
    (tmp_path / "photos").mkdir()
    draw_shape("red", "circle").save(tmp_path / "photos" / "a.png")
    out = tmp_path / "captions.jsonl"
    command = ["caption", str(tmp_path / "photos"), "--model", str(directory), "--out", str(out)]
    assert main([*command, "--max-new-tokens", "2"]) == 2
    assert "--trust-remote-code" in one_error_line(capsys.readouterr().err)
    assert main([*command, "--max-new-tokens", "2", "--trust-remote-code"]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_app_loads_a_custom_code_model_only_with_trust(imported):
    from apps.gradio_app import build_app

    directory, _ = imported
    with pytest.raises(VlmError, match="--trust-remote-code"):
        build_app(models=[str(directory)]).models.get(str(directory))
    app = build_app(models=[str(directory)], trust_remote_code=True)
    assert isinstance(app.models.get(str(directory)), FlamingoModel)
