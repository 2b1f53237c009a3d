"""Developers: put a trained model into the package as a shipped model.

    vlmstack ship runs/llava --name llava-easyvqa

The weights are stored as fp16 (half the bytes in git; loaders upcast to fp32); config,
card and tokenizer files are copied as they are. Every retrain adds its size to git
history: ship only when a recipe really changed.
"""

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlm.atomic import atomic_path, write_bytes
from vlm.hub import WEIGHTS_DIR, WEIGHTS_FILE


def ship(run_dir: str | Path, name: str) -> Path:
    """Copy a trained model directory into the package as shipped model `name`, with
    fp16 weights (half the bytes in git; loaders upcast to fp32)."""
    run_dir, target = Path(run_dir), WEIGHTS_DIR / name
    target.mkdir(parents=True, exist_ok=True)
    for extra in run_dir.iterdir():
        if (
            extra.is_file()
            and (extra.suffix == ".json" or extra.name.startswith("tokenizer"))
            and not extra.name.startswith("checkpoint")
        ):
            write_bytes(target / extra.name, extra.read_bytes())
    with safe_open(str(run_dir / WEIGHTS_FILE), "pt") as f:
        metadata = f.metadata()
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(run_dir / WEIGHTS_FILE)).items()}
    with atomic_path(target / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return target
