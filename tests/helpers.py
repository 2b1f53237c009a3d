"""Helpers shared by the tests: pictures and hostile folders to run on, small models made
to show differences, and checks of how the CLI fails. Fixtures live in conftest.py."""

import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
GOOD_IMAGES = ["blue-rectangle.png", "green-circle.png", "red-circle.png"]  # what draw_good_images writes
# make_hazard_folder's bad entries, as reports print them
HAZARDS = ["fifo.png", "dangling.png", "loop.png", "caf\\xe9.png"]


# ---- pictures and folders ----


def draw_shape(color: str, shape: str, size: int = 64, offset: int = 0) -> Image.Image:
    """A white image with one coloured circle or rectangle."""
    image = Image.new("RGB", (size, size), (250, 245, 240))
    draw = ImageDraw.Draw(image)
    box = (12 + offset, 12 + offset, 44 + offset, 44 + offset)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image


def draw_good_images(folder: Path) -> Path:
    """`folder` (created if missing) holding the three GOOD_IMAGES, each showing what its name says."""
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(GOOD_IMAGES):
        color, shape = name.removesuffix(".png").split("-")
        draw_shape(color, shape, offset=i).save(folder / name)
    return folder


def make_hazard_folder(folder: Path) -> Path:
    """`folder` (created if missing) with the GOOD_IMAGES beside the HAZARDS: a FIFO named like an image
    (opening it blocks), a dangling link, a link loop and a file whose name is latin-1 bytes."""
    draw_good_images(folder)
    os.mkfifo(folder / "fifo.png")
    os.symlink(folder / "missing.png", folder / "dangling.png")
    os.symlink("loop.png", folder / "loop.png")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:
        f.write((folder / "red-circle.png").read_bytes())
    return folder


@contextlib.contextmanager
def fail_if_blocked(seconds: int):
    """Fail the test (instead of hanging the suite) if the block takes longer than
    `seconds`, e.g. blocked on a FIFO or a lock. Main thread only (SIGALRM)."""

    def blocked(signum, frame):  # pytest.fail: not an OSError, so no `except OSError` can swallow it
        pytest.fail(f"blocked for {seconds} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- models ----


def vlm_batch(model, turns: list[tuple[str, str]], images: list) -> dict:
    """One conversation as the keyword arguments of a VLM's training forward (with labels)."""
    ids, labels = model.encode(turns)
    input_ids = torch.tensor([ids])
    pixels = torch.stack([model.transform(im) for im in images]) if images else None
    return dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixels=pixels, labels=torch.tensor([labels])
    )


def losses_fitting_one_batch(model, batch: dict, *, lr: float, steps: int = 15) -> list[float]:
    """The losses of `steps` AdamW steps (no weight decay) of the trainable parameters on `batch`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def open_gates(model, value: float = 0.5) -> None:
    """Set every tanh gate (Flamingo's cross-attention and feed-forward gates, 0 when
    built) to `value`, so the images reach the LM; a model without gates is unchanged."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(value)


def prompt_sensitive(model, scale: float = 10.0):
    """`model` with its LM's weight matrices scaled up, so that its random answers depend on
    the whole prompt (at initialisation the last token alone decides them)."""
    with torch.no_grad():
        for name, param in model.lm.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.mul_(scale)
    return model


def greedy_answer(model, ids: list[int], max_new_tokens: int) -> str:
    """The greedy answer to prompt `ids` (no images) computed with the model's training
    forward, recomputing the whole sequence each step: no prompt builder, no cache."""
    new: list[int] = []
    stops = {model.tokenizer.eos_token_id, model.chunk_end_id}
    with torch.no_grad():
        for _ in range(max_new_tokens):
            sequence = torch.tensor([ids + new])
            token = int(model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
    return model.tokenizer.decode(new, skip_special_tokens=True).strip()


# ---- training runs ----


def tiny_clip_recipe(data: Path, **train) -> dict:
    """A recipe training clip-tiny on the captions file `data`, without validation split or
    augmentation: 4 epochs of 12-image batches, logging every step; `train` overrides."""
    defaults = {"epochs": 4, "batch_size": 12, "lr": 2e-3, "warmup_steps": 2, "workers": 0, "log_every": 1}
    return {
        "arch": "clip-tiny",
        "data": str(data),
        "val_fraction": 0.0,
        "augment": None,
        "train": {**defaults, **train},
    }


def write_json(path: Path, data) -> str:
    """`data` written to `path` as JSON; returns the path as a string (what a recipe
    argument takes)."""
    path.write_text(json.dumps(data))
    return str(path)


def logged_losses(run: Path) -> list[float]:
    """The training losses a run wrote to metrics.csv, one per logged row."""
    return [float(line.split(",")[3]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def write_checkpoint(run: Path, state: dict) -> None:
    """`state` saved as the run's checkpoint.pt, with the checkpoint.json record (step and
    checksum) that makes a resume accept it."""
    from vlm.hashing import sha256_file

    run.mkdir(exist_ok=True)
    torch.save(state, run / "checkpoint.pt")
    (run / "checkpoint.json").write_text(json.dumps({"step": 1, "sha256": sha256_file(run / "checkpoint.pt")}))


# ---- the CLI and servers ----


def one_error_line(err: str) -> str:
    """The one line of a command's stderr that reports an error (progress bars and
    argparse's usage lines may share stderr); fails on a traceback or a second error."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
