"""Training objectives: modules whose forward(batch) is the loss, so DistributedDataParallel
can wrap them. They own no parameters of their own; they borrow the model's."""

import torch
from torch import nn

from vlm.chat_template import IGNORE_INDEX
from vlm.losses import clip_loss, dedupe_texts, siglip_loss
from vlm.train import distributed


class LanguageModelLoss(nn.Module):
    """model(**inputs, labels=...).loss for causal LMs and both VLMs.

    The model's loss is the mean over this rank's target tokens. Under DDP it is rescaled
    by this rank's share of all ranks' target tokens, so the average DDP takes (of losses
    and gradients) is the mean over the global batch's tokens, as with one process."""

    def __init__(self, model: nn.Module, *, images: bool):
        super().__init__()
        self.model, self.images = model, images

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        if self.images:
            inputs["pixels"] = batch["pixels"]
        loss = self.model(**inputs).loss
        if distributed.world_size() > 1:
            local = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = loss * local / distributed.average(local)
        return loss


class ContrastiveLoss(nn.Module):
    """CLIP or SigLIP loss over the *global* batch: features are gathered from every rank
    (with gradients), captions deduplicated across all of them."""

    def __init__(self, clip, *, loss: str):
        super().__init__()
        self.clip, self.loss = clip, loss

    def forward(self, batch: dict) -> torch.Tensor:
        model = self.clip.model
        image_features = distributed.gather_with_grad(self.clip.image_features(batch["pixels"]))
        local_texts, local_targets = dedupe_texts(batch["tokens"])
        text_features = distributed.gather_with_grad(self.clip.text_features(local_texts))
        # Captions repeated on several ranks become one text: keep each one's first copy.
        all_texts = distributed.gather(local_texts)
        texts, first_of = dedupe_texts(all_texts)
        keep = torch.full((len(texts),), -1, dtype=torch.long)
        keep.scatter_reduce_(0, first_of, torch.arange(len(all_texts)), reduce="amin", include_self=False)
        sizes = distributed.gather(torch.tensor([len(local_texts)]))
        offset = int(sizes[: distributed.rank()].sum())  # where this rank's texts start in all_texts
        local_global = first_of[offset + local_targets]  # this rank's targets, numbered globally
        targets = distributed.gather(local_global)
        text_features = text_features[keep]
        if self.loss == "siglip":
            return siglip_loss(image_features, text_features, targets, model.logit_scale, model.logit_bias)
        return clip_loss(image_features, text_features, targets, model.logit_scale)
