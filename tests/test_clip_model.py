import pytest
import torch

from tests.helpers import draw_shape
from vlm.clip import build_clip, load_clip
from vlm.errors import VlmError


def test_save_load_round_trip_gives_identical_embeddings(tiny_clip, tmp_path):
    tiny_clip.save(tmp_path / "m")
    loaded = load_clip(str(tmp_path / "m"))
    images = [draw_shape("red", "circle"), draw_shape("blue", "rectangle")]
    assert torch.equal(tiny_clip.encode_images(images), loaded.encode_images(images))
    assert torch.equal(tiny_clip.encode_texts(["a red circle"]), loaded.encode_texts(["a red circle"]))


def test_fp16_save_stays_close(tiny_clip, tmp_path):
    tiny_clip.save(tmp_path / "half", dtype=torch.float16)
    loaded = load_clip(str(tmp_path / "half"))
    assert (loaded.encode_texts(["x"]) - tiny_clip.encode_texts(["x"])).abs().max() < 1e-2


def test_embeddings_are_normalised(tiny_clip):
    vectors = tiny_clip.encode_images([draw_shape("green", "circle")] * 3)
    assert vectors.shape == (3, 128)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_open_clip_architecture_from_a_local_torch_file(tmp_path):
    """The real-pretrained path, offline: a random ViT-S-32 saved with torch.save."""
    torch.manual_seed(0)
    reference = build_clip("ViT-S-32").eval()
    path = tmp_path / "vit-s-32.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.model.state_dict().items()}}, path)
    loaded = load_clip(f"open_clip:ViT-S-32@{path}")
    assert loaded.image_size == 224 and loaded.context_length == 77
    image = draw_shape("red", "circle")
    assert torch.allclose(loaded.encode_images([image]), reference.encode_images([image]), atol=1e-6)
    assert loaded.fingerprint != "random-init"


def test_open_clip_safetensors_file(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    save_file(tiny_clip.model.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_clip(f"open_clip:clip-tiny@{tmp_path / 'w.safetensors'}")
    assert torch.equal(loaded.encode_texts(["a"]), tiny_clip.encode_texts(["a"]))


def test_weights_that_do_not_fit_are_a_clear_error(tiny_clip, tmp_path):
    torch.save(tiny_clip.model.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(VlmError, match="do not fit"):
        load_clip(f"open_clip:ViT-S-32@{tmp_path / 'tiny.pt'}")


def test_pickled_objects_are_refused(tmp_path):
    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": object()}))
    with pytest.raises(VlmError, match="safetensors"):
        load_clip(f"open_clip:clip-tiny@{tmp_path / 'evil.pt'}")


@pytest.mark.parametrize("spec", ["nonsense", "open_clip:NoSuchArch@/x.pt", "open_clip:clip-tiny@/no/such/file.pt"])
def test_unknown_models_are_vlm_errors(spec):
    with pytest.raises(VlmError):
        load_clip(spec)


def test_unknown_architecture_lists_presets():
    with pytest.raises(ValueError, match="clip-tiny"):
        build_clip("clip-enormous")
