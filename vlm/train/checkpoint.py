"""Training checkpoints that are either whole or refused.

`checkpoint.pt` (model, optimiser, position; loaded with weights_only=True) is written
atomically, then `checkpoint.json` records its sha256. On resume a checkpoint whose
bytes do not match the record — half-written, truncated, replaced — raises instead of
loading.
"""

import json
import pickle
from pathlib import Path

import torch

from vlm.atomic import atomic_path, write_json
from vlm.errors import VlmError
from vlm.hashing import sha256_file

STATE_FILE = "checkpoint.pt"
RECORD_FILE = "checkpoint.json"


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write the state dict, then the record that vouches for it."""
    run_dir = Path(run_dir)
    with atomic_path(run_dir / STATE_FILE) as tmp:
        torch.save(state, tmp)
    write_json(run_dir / RECORD_FILE, {"step": state["step"], "sha256": sha256_file(run_dir / STATE_FILE)})


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / STATE_FILE).exists() or (Path(run_dir) / RECORD_FILE).exists()


def load_checkpoint(run_dir: Path) -> dict:
    """The verified checkpoint state.

    Raises:
        VlmError: the record or the state file is missing, the record is damaged, their
            checksums differ, or the state holds more than tensors and plain values.
    """
    run_dir = Path(run_dir)
    state_path, record_path = run_dir / STATE_FILE, run_dir / RECORD_FILE
    if not record_path.is_file() or not state_path.is_file():
        raise VlmError(f"{run_dir}: incomplete checkpoint ({STATE_FILE} and {RECORD_FILE} must both exist)")
    if sha256_file(state_path) != _recorded_sha256(record_path):
        raise VlmError(
            f"{state_path}: checksum does not match {RECORD_FILE}; the checkpoint is damaged, refusing to load it"
        )
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise VlmError(
            f"{state_path}: holds pickled objects that weights_only loading refuses; "
            "a vlmstack checkpoint holds only tensors and plain values, so this one was not written by it; start over with another --out"
        ) from None


def _recorded_sha256(record_path: Path) -> str:
    """The sha256 `save_checkpoint` recorded.

    Raises:
        VlmError: the record is not JSON or has no sha256.
    """
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise VlmError(f"{record_path}: damaged (no sha256 of {STATE_FILE}); start over with another --out")
    return record["sha256"]
