"""Helpers shared by the tests (fixtures live in conftest.py)."""

import torch
from PIL import Image, ImageDraw

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}


def draw_shape(color: str, shape: str, size: int = 64, offset: int = 0) -> Image.Image:
    """A white image with one coloured circle or rectangle."""
    image = Image.new("RGB", (size, size), (250, 245, 240))
    draw = ImageDraw.Draw(image)
    box = (12 + offset, 12 + offset, 44 + offset, 44 + offset)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image


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
