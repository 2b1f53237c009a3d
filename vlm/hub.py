"""Model directories: shipped names -> folders, the files every model directory holds,
and model cards.

A model is a directory: `config.json` (with a "kind": clip, llava or flamingo; a language
model directory is a Hugging Face one), `model.safetensors`, optional tokenizer files and
`model_card.json` (recipe, command, time, machine, metrics). Weights are never pickled.
"""

import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vlm.atomic import atomic_path, write_json
from vlm.errors import VlmError
from vlm.hashing import sha256_file

WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"


def shipped_names() -> list[str]:
    """Names of the models shipped inside the package (e.g. "clip-easyvqa")."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(d.name for d in WEIGHTS_DIR.iterdir() if (d / CONFIG_FILE).is_file())


def resolve_dir(spec: str | Path) -> Path | None:
    """The directory for a shipped name or a model directory path; None if neither."""
    spec = str(spec)
    if spec in shipped_names():
        return WEIGHTS_DIR / spec
    path = Path(spec).expanduser()
    return path if (path / CONFIG_FILE).is_file() else None


def read_config(directory: Path) -> dict:
    """The JSON object in the directory's config.json.

    Raises:
        VlmError: the file is not UTF-8 JSON, or holds something other than an object.
        OSError: the file cannot be read.
    """
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise VlmError(
            f"{path}: not valid JSON ({_first_line(e)}); restore the file from where the model came from"
        ) from None
    if not isinstance(data, dict):
        raise VlmError(
            f"{path}: must hold a JSON object, not a {type(data).__name__}; restore the file from where the model came from"
        )
    return data


def is_count(value) -> bool:
    """A whole number of at least 1 (not a bool): a size, a length, a number of layers."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@contextlib.contextmanager
def config_errors(directory: Path, kind: str):
    """Turn what building a model out of its config raises on bad values into one VlmError
    naming config.json: TypeError (a missing or unknown field, a wrong type), ValueError,
    KeyError, RuntimeError (torch's answer to an impossible shape) and VlmError (a check of
    the model's own). Wrap only the building, so other errors keep their own message."""
    try:
        yield
    except (TypeError, ValueError, KeyError, RuntimeError, VlmError) as e:
        reason = f"missing {e.args[0]!r}" if isinstance(e, KeyError) else _first_line(e)
        raise VlmError(
            f"{Path(directory) / CONFIG_FILE}: not a valid {kind} config ({reason}); fix it or save the model again"
        ) from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:200]


def model_kind(directory: Path) -> str:
    """ "clip", "llava", "flamingo", or "lm" for a Hugging Face language model directory."""
    config = read_config(directory)
    return config.get("kind", "lm" if "model_type" in config else "unknown")


def save_module(directory: Path, module: torch.nn.Module, *, dtype=None) -> None:
    """Write a module's state to model.safetensors atomically, optionally cast (fp16 to
    ship). Tensors shared between keys (tied embeddings) are stored once; their other
    names are recorded so `load_module` can tell them from missing weights."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        stored[name] = (tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor).contiguous()
    with atomic_path(Path(directory) / WEIGHTS_FILE) as tmp:
        save_file(stored, str(tmp), metadata={"aliases": json.dumps(aliases)})


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file, and the aliases `save_module` recorded
    (name -> the stored name of the same tensor).

    Raises:
        VlmError: the file is not a readable safetensors file (random bytes, cut short).
    """
    try:
        with safe_open(str(path), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        state = load_file(str(path))
    except (SafetensorError, ValueError) as e:  # ValueError: the aliases are not JSON
        raise VlmError(
            f"{path}: not a readable safetensors file ({_first_line(e)}); the copy is damaged, fetch it again"
        ) from None
    if not isinstance(aliases, dict):
        raise VlmError(
            f"{path}: not a readable safetensors file (its aliases are not an object); the copy is damaged, fetch it again"
        )
    return state, aliases


def load_module(directory: Path, module: torch.nn.Module) -> None:
    """Load model.safetensors into `module` (as float32).

    Raises:
        VlmError: the file is missing, not safetensors, or its tensors do not fit the module.
    """
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise VlmError(f"{directory}: missing {WEIGHTS_FILE}")
    state, aliases = read_weights(path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise VlmError(f"{path}: weights do not fit the model ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise VlmError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def save_config(directory: Path, config: dict) -> None:
    write_json(Path(directory) / CONFIG_FILE, config)


def save_pretrained(obj, directory: Path, **options) -> None:
    """`obj.save_pretrained` (a transformers model or tokenizer) into `directory`, each file
    moved in by one rename: a crash never leaves a half-written file there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as tmp:
        obj.save_pretrained(tmp, **options)
        for path in Path(tmp).iterdir():
            os.replace(path, directory / path.name)


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, first 16 hex digits: names a set of weights."""
    return sha256_file(path)[:16]


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available (Linux /proc/meminfo), or None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def machine_info() -> dict:
    """What a model card records about the machine that trained or measured it."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def command_line() -> str:
    """The command being run, for model cards ("vlmstack train clip ...")."""
    program = "vlmstack" if sys.argv[0].endswith("vlmstack") else sys.argv[0]
    return " ".join([program, *sys.argv[1:]])


def write_run_card(
    directory: Path, *, model: torch.nn.Module, train_seconds: float, validation: dict, **fields
) -> dict:
    """The card of a finished training run: `fields` (kind, recipe, ...) plus what every
    trainer records: the command, training time, parameter counts, machine and validation."""
    return update_card(
        directory,
        **fields,
        command=command_line(),
        train_seconds=round(train_seconds, 1),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        parameters=sum(p.numel() for p in model.parameters()),
        machine=machine_info(),
        validation=validation,
    )


def update_card(directory: Path, **fields) -> dict:
    """Merge fields into model_card.json (created if missing) and return the card."""
    path = Path(directory) / CARD_FILE
    card = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    card.update(fields)
    write_json(path, card)
    return card
