"""`hf:ORG/NAME` model specs (vlm/download.py): downloaded through huggingface_hub, never
pickles; offline or on a failed download, one line saying how to pass a directory."""

from fnmatch import fnmatch

import huggingface_hub
import pytest

from tests.helpers import one_error_line
from tests.test_hf_llava import save_tiny_hf_llava
from vlm import download
from vlm.cli import main
from vlm.errors import VlmError
from vlm.llava import LlavaModel
from vlm.load import load_vlm

ADVICE = "`hf download x/y --local-dir DIR`) and pass --model DIR"


def test_offline_hub_spec_fails_in_one_line_with_how_to_pass_a_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VlmError) as error:
        load_vlm("hf:x/y")
    message = str(error.value)
    assert "\n" not in message and "x/y" in message and "offline" in message and ADVICE in message


def test_network_error_during_download_fails_in_one_line(monkeypatch, capsys):
    def unreachable(repo_id, **options):
        raise huggingface_hub.errors.LocalEntryNotFoundError("ConnectError: [Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    code = main(["eval", "vqa", "--model", "hf:x/y", "--data", "easyvqa:test", "--limit", "1"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "cannot download x/y (the Hugging Face hub is unreachable" in line and ADVICE in line


def test_hub_spec_loads_the_downloaded_directory_with_safe_patterns_only(monkeypatch, tmp_path):
    save_tiny_hf_llava(tmp_path, hidden_act="quick_gelu", feature_layer=-2, strategy="default")
    calls = []

    def snapshot(repo_id, **options):
        calls.append((repo_id, options))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    model = load_vlm("hf:x/y")
    assert isinstance(model, LlavaModel) and model.image_token_count == 16
    [(repo, options)] = calls
    assert repo == "x/y"
    patterns = options["allow_patterns"]
    for pickle in ("pytorch_model.bin", "checkpoint.pt", "model.pth", "weights.pkl", "training_args.bin"):
        assert not any(fnmatch(pickle, p) for p in patterns), pickle
    for wanted in ("model-00001-of-00002.safetensors", "config.json", "chat_template.jinja", "tokenizer.model"):
        assert any(fnmatch(wanted, p) for p in patterns), wanted


def test_malformed_hub_spec_is_refused_before_any_download():
    with pytest.raises(VlmError, match="hf:ORG/NAME"):
        load_vlm("hf:not-a-repo")


def test_app_offers_a_hub_spec_by_its_name_and_downloads_it_once_at_start(monkeypatch, tmp_path):
    from apps.gradio_app import build_app

    save_tiny_hf_llava(tmp_path, hidden_act="quick_gelu", feature_layer=-2, strategy="default")
    calls = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **_: calls.append(repo_id) or str(tmp_path)
    )
    app = build_app(models=["hf:x/y"])
    assert app.models.allowed[-1] == "hf:x/y" and calls == ["x/y"]
    assert isinstance(app.models.get("hf:x/y"), LlavaModel) and calls == ["x/y"]
