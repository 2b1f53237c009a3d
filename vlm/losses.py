"""Contrastive losses (CLIP, SigLIP) that never treat identical captions as negatives.

A batch of B images comes with U <= B *distinct* captions: `targets[i]` is the index of
image i's caption among them (`dedupe_texts`). easy-VQA has only 24 captions, so a batch
of 64 repeats most of them; the standard CLIP loss would push an image away from its own
caption's duplicates. Here each distinct caption is one text whose positives are all the
images carrying it. Without duplicates (U = B, targets = arange(B)) both losses are the
usual ones.
"""

import torch
import torch.nn.functional as F


def dedupe_texts(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids -> ((U, L) distinct rows, (B,) index of each row among them)."""
    unique, targets = torch.unique(tokens, dim=0, return_inverse=True)
    return unique, targets


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive text->image targets.

    Args:
        image_features: (B, D) L2-normalised.
        text_features: (U, D) L2-normalised, one row per distinct caption.
        targets: (B,) caption index of each image.
        logit_scale: log of the temperature's inverse (exp'd here, as in CLIP).
    """
    logits = logit_scale.exp() * image_features @ text_features.T  # (B, U)
    image_to_text = F.cross_entropy(logits, targets)
    positives = F.one_hot(targets, text_features.shape[0]).T.float()  # (U, B)
    text_to_image = F.cross_entropy(logits.T, positives / positives.sum(1, keepdim=True))
    return (image_to_text + text_to_image) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023): +1 for an image and its caption, -1 otherwise.

    Shapes as in `clip_loss`; summed over captions, averaged over images.
    """
    logits = logit_scale.exp() * image_features @ text_features.T + logit_bias  # (B, U)
    signs = 2 * F.one_hot(targets, text_features.shape[0]).float() - 1
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]
