"""One training stage of a visual language model (LLaVA or Flamingo): tokenise the
records, run the shared Trainer, save the model directory with its model card.

Validation reports the loss and the answer accuracy under teacher forcing: the share of
answers whose every token is the model's top prediction.
"""

import logging
from pathlib import Path
from typing import Callable

import torch

from vlm import hub
from vlm.chat_template import IGNORE_INDEX
from vlm.data.sequences import CollateSequences, ConversationDataset, encode_records
from vlm.train import distributed
from vlm.train.objectives import LanguageModelLoss
from vlm.train.trainer import TrainConfig, Trainer, param_groups

log = logging.getLogger(__name__)


def answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(answers whose every token is the argmax prediction, answers). An answer is a run of
    consecutive labelled positions."""
    predicted = logits[:, :-1].argmax(-1)  # (B, T-1): position t predicts token t+1
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    correct = (predicted == targets) | ~labelled
    starts = labelled & ~torch.nn.functional.pad(labelled[:, :-1], (1, 0))
    answer_id = starts.long().cumsum(-1) * labelled  # 0 outside answers
    right = total = 0
    for row_ids, row_correct in zip(answer_id, correct):
        for k in row_ids.unique().tolist():
            if k:
                total += 1
                right += bool(row_correct[row_ids == k].all())
    return right, total


def train_stage(
    model,
    *,
    records: list[dict],
    val_records: list[dict],
    config: TrainConfig,
    run_dir: Path,
    resume: bool,
    card: dict,
    augment: Callable | None = None,
    save: Callable[[Trainer, dict], None] | None = None,
) -> dict:
    """Train `model`'s trainable parameters on LLaVA-format records (plus Flamingo's few-shot
    and multi-image ones); save the model to run_dir. Returns validation metrics. `augment`
    (PIL -> PIL) applies to training images only. `save(trainer, metrics)` replaces the
    final save (the whole model and its run card), e.g. to write only an adapter."""
    torch.manual_seed(config.seed)
    sequences = encode_records(records, model, model.max_length)
    val_sequences = encode_records(val_records, model, model.max_length)
    log.info("%d training sequences, %d validation", len(sequences), len(val_sequences))
    collate = CollateSequences(model.tokenizer.pad_token_id)

    def run(batch: dict):
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixels=batch["pixels"],
            labels=batch["labels"],
        )

    def evaluate() -> dict:
        dataset = ConversationDataset(val_sequences, transform=model.transform)
        losses, right, answers = [], 0, 0
        with torch.inference_mode():
            for start in range(0, len(dataset), 64):
                batch = collate([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
                if batch["size"] == 0:
                    continue
                out = run(batch)
                losses.append(out.loss.item())
                r, a = answer_hits(out.logits, batch["labels"])
                right, answers = right + r, answers + a
        return {"val_loss": sum(losses) / max(1, len(losses)), "val_answer_accuracy": right / max(1, answers)}

    trainer = Trainer(
        model=model,
        groups=param_groups(model, config.weight_decay),
        config=config,
        run_dir=run_dir,
        dataset=ConversationDataset(sequences, transform=model.transform, augment=augment),
        collate=collate,
        objective=LanguageModelLoss(model, images=True),
        evaluate=evaluate if val_sequences else None,
    )
    metrics = trainer.fit(resume=resume)
    if distributed.is_main():
        if save is None:
            _save(model, run_dir, trainer, card, metrics)
        else:
            save(trainer, metrics)
    distributed.barrier()  # a next stage on other ranks starts from the saved model
    return metrics


def _save(model, run_dir: Path, trainer: Trainer, card: dict, metrics: dict) -> None:
    model.save(run_dir)
    hub.write_run_card(run_dir, model=model, train_seconds=trainer.train_seconds, validation=metrics, **card)
