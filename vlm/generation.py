"""Token generation shared by both visual language models.

The model prepares a left-padded batch of prompt embeddings (`Prompt`); `generate`
runs the prefill once, then decodes one token per step reusing the key/value cache,
yielding each step's tokens so callers can stream. Positions come from the attention
mask, so a left-padded prompt produces exactly the tokens it would alone.

A model plugs in with two methods:
    token_embeddings(ids (B, T)) -> (B, T, H)
    step(embeds (B, T, H), attention_mask (B, T_total), position_ids (B, T), cache, prompt, start) -> (logits (B, T, V), cache)
where `start` is how many tokens of each row the cache already holds (the model may
need it, e.g. to know which image a generated token follows).

Rows may differ in their GenerationConfig (one per row: the scheduler of vlm/scheduler.py
batches different callers' requests); each row then samples with its own generator, so a
row's tokens are those it would get alone.
"""

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass (with temperature > 0)
    use_cache: bool = True  # False recomputes the whole sequence each step (for comparison)
    seed: int = 0  # sampling seed

    def __post_init__(self):
        """Raises ValueError naming a field whose value generation cannot use (written so
        that NaN fails every check)."""
        if not self.max_new_tokens >= 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be above 0 and at most 1, not {self.top_p}")


@dataclass
class Prompt:
    embeds: torch.Tensor  # (B, T, H) left-padded prompt embeddings
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    context: Any = None  # model-specific state (e.g. Flamingo's visual latents)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (B, T) ids padded on the left with `pad_id`, and (B, T) mask (1 = real)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return input_ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token counting only real ones (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _choose(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, V) -> (B,) next tokens: argmax, or a sample from the top-p nucleus."""
    if config.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > config.top_p  # keep the first token always
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _choose_rows(logits: torch.Tensor, configs: Sequence[GenerationConfig], generators: list) -> torch.Tensor:
    """(B, V) -> (B,) next tokens, each row by its own config and generator."""
    if all(c.temperature <= 0 for c in configs):
        return logits.argmax(-1)
    return torch.cat([_choose(logits[i : i + 1], c, g) for i, (c, g) in enumerate(zip(configs, generators))])


@torch.inference_mode()
def generate(
    model,
    prompt: Prompt,
    *,
    stop_ids: tuple[int, ...],
    pad_id: int,
    config: GenerationConfig | Sequence[GenerationConfig],
    ended: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield (B,) tokens per step until every row has produced one of `stop_ids`, reached its
    max_new_tokens, or been ended by the caller.

    config: one for all rows, or one per row.
    ended: optional (B,) bool the caller may set between steps to end rows (a client gone).
    Rows that finished keep receiving `pad_id`.
    """
    batch = prompt.attention_mask.shape[0]
    configs = [config] * batch if isinstance(config, GenerationConfig) else list(config)
    generators = [torch.Generator().manual_seed(c.seed) for c in configs]
    limits = torch.tensor([c.max_new_tokens for c in configs])  # (B,)
    use_cache = all(c.use_cache for c in configs)
    mask = prompt.attention_mask
    done = torch.zeros(batch, dtype=torch.bool)
    logits, cache = model.step(prompt.embeds, mask, positions(mask), None, prompt, 0)
    all_embeds = prompt.embeds
    for step in range(int(limits.max())):
        if ended is not None:
            done |= ended
        token = _choose_rows(logits[:, -1], configs, generators)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        yield token
        done |= torch.isin(token, torch.tensor(stop_ids)) | (limits <= step + 1)
        if done.all():
            return
        new_embeds = model.token_embeddings(token[:, None])  # (B, 1, H)
        start = mask.shape[1]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        if use_cache:
            logits, cache = model.step(new_embeds, mask, positions(mask)[:, -1:], cache, prompt, start)
        else:
            all_embeds = torch.cat([all_embeds, new_embeds], dim=1)
            logits, _ = model.step(all_embeds, mask, positions(mask), None, prompt, 0)
