"""HF LLaVA export benchmark: the shipped LLaVA exported with `vlmstack export --format hf-llava`,
answered by transformers' LlavaForConditionalGeneration, against vlmstack on the same questions.

    .venv/bin/python -m benchmarks.hf_export [--transformers4 /tmp/tf457]

Measures, on the first 200 easyvqa:test questions (evaluation only): how many greedy answers
are identical at batch 16 with left padding (transformers gets the exported processor's
pixels and token ids, vlmstack its own), both accuracies, the largest logit difference on
the first batch; and generation throughput (image encoding included, after a warm-up),
vlmstack vs transformers' `generate`, at batch 1 and 16 with 24 forced new tokens. With
--transformers4 DIR, also whether transformers 4 (installed in DIR) loads the export and
gives the same answers. Writes docs/benchmarks/hf_export.md and .json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from benchmarks.common import ROOT, timed, write_report
from vlm.data.sources import vqa_records
from vlm.eval.vqa import vqa_metrics
from vlm.generation import GenerationConfig, generate
from vlm.hf_llava import export_hf_llava
from vlm.images import load_image
from vlm.load import load_vlm

QUESTIONS = 200
BATCH = 16
NEW_TOKENS = 24  # forced, for throughput


def hf_batch(processor, images, questions):
    """The exported processor's input for one batch (chat template, left padding)."""
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def hf_answers(model, processor, images, questions, max_new_tokens: int = 8) -> list[str]:
    batch = hf_batch(processor, images, questions)
    with torch.inference_mode():
        tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return [
        t.strip() for t in processor.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def largest_logit_difference(ours, theirs, processor, images, questions) -> float:
    """Max |ours - transformers'| over real (unpadded) positions of one batch, same pixels."""
    batch = hf_batch(processor, images, questions)
    with torch.inference_mode():
        mine = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixels=batch["pixel_values"])
        reference = theirs(**batch)
    real = batch["attention_mask"].bool()
    return float((mine.logits - reference.logits)[real].abs().max())


def our_tokens_per_second(model, images, batch: int) -> float:
    """Tokens/s of vlmstack's generation, image encoding included (as in transformers' generate)."""
    model.__dict__.pop("_feature_cache", None)  # encode the images again, as transformers does
    sequences = [model.encode([("user", "<image>\nwhat color is the shape?")], generation_prompt=True)[0]] * len(images)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    started = time.perf_counter()
    for s in range(0, len(images), batch):
        prompt = model.prepare(sequences[s : s + batch], [[im] for im in images[s : s + batch]])
        for _ in generate(model, prompt, stop_ids=(-1,), pad_id=model.tokenizer.pad_token_id, config=config):
            pass
    return len(images) * NEW_TOKENS / (time.perf_counter() - started)


def hf_tokens_per_second(model, processor, images, batch: int) -> float:
    """Tokens/s of transformers' generate, processor included."""
    started = time.perf_counter()
    for s in range(0, len(images), batch):
        inputs = hf_batch(processor, images[s : s + batch], ["what color is the shape?"] * len(images[s : s + batch]))
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return len(images) * NEW_TOKENS / (time.perf_counter() - started)


def other_transformers(site: str, checkpoint: Path, records) -> dict:
    """Load and answer with the transformers installed in `site` (a subprocess: one process
    cannot import two transformers); returns its version, loading info and answers."""
    request = {
        "checkpoint": str(checkpoint),
        "images": [r.image for r in records],
        "questions": [r.question for r in records],
        "batch": BATCH,
        "max_new_tokens": 8,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    env = {**os.environ, "PYTHONPATH": site}
    command = [sys.executable, "-m", "benchmarks.hf_export_transformers4", f.name]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    os.unlink(f.name)
    if done.returncode:
        raise SystemExit(f"transformers in {site} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def older_transformers_lines(older: dict | None) -> list[str]:
    if older is None:
        return []
    info = older["loading_info"]
    return [
        f"- transformers {older['transformers']} (another install, in a subprocess): loads the export with "
        f"{len(info['missing_keys'])} missing and {len(info['unexpected_keys'])} unexpected keys; "
        f"answers identical to vlmstack's on **{older['identical_answers']} / {QUESTIONS}**.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-easyvqa")
    parser.add_argument(
        "--transformers4",
        metavar="DIR",
        help="also answer with the transformers installed in DIR (pip install --target DIR --no-deps "
        "'transformers==4.57.*' 'tokenizers<0.23' 'huggingface-hub<1.0')",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    ours = load_vlm(args.model)
    records = vqa_records("easyvqa:test")[:QUESTIONS]
    images = [load_image(r.image) for r in records]
    questions = [r.question for r in records]
    workdir = tempfile.TemporaryDirectory()
    out, export_seconds = timed(export_hf_llava, ours, Path(workdir.name) / "hf")
    theirs, load_seconds = timed(LlavaForConditionalGeneration.from_pretrained, str(out))
    theirs.eval()
    processor = AutoProcessor.from_pretrained(str(out))
    mine, reference = [], []
    for s in range(0, len(records), BATCH):
        mine += ours.answer_batch(images[s : s + BATCH], questions[s : s + BATCH], max_new_tokens=8)
        reference += hf_answers(theirs, processor, images[s : s + BATCH], questions[s : s + BATCH])
    answers = [r.answer for r in records]
    same = sum(a == b for a, b in zip(mine, reference))
    older = other_transformers(args.transformers4, out, records) if args.transformers4 else None
    workdir.cleanup()
    logit_diff = largest_logit_difference(ours, theirs, processor, images[:BATCH], questions[:BATCH])
    our_tokens_per_second(ours, images[:4], 2)  # warm up both before timing
    hf_tokens_per_second(theirs, processor, images[:4], 2)
    throughput = {
        f"batch_{b}": {
            "vlmstack": our_tokens_per_second(ours, images[:48], b),
            "transformers": hf_tokens_per_second(theirs, processor, images[:48], b),
        }
        for b in (1, BATCH)
    }
    data = {
        "model": args.model,
        "projector": ours.config.projector,
        "questions": len(records),
        "identical_answers": same,
        "accuracy": {"vlmstack": vqa_metrics(mine, answers), "transformers": vqa_metrics(reference, answers)},
        "max_logit_diff_first_batch": logit_diff,
        "export_seconds": export_seconds,
        "transformers_load_seconds": load_seconds,
        "tokens_per_second": throughput,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine makes the timings noisy
    }
    if older:
        older["identical_answers"] = sum(a == b for a, b in zip(mine, older.pop("answers")))
        data["older_transformers"] = older
    rows = [
        f"| {b.replace('_', ' ')} | {t['vlmstack']:.0f} | {t['transformers']:.0f} | "
        f"{t['vlmstack'] / t['transformers']:.2f}x |"
        for b, t in throughput.items()
    ]
    sections = [
        f"`{args.model}` ({ours.config.projector} projector) exported with `vlmstack export {args.model} "
        f"--format hf-llava --out DIR` ({export_seconds:.1f} s) and loaded with transformers' "
        f"`LlavaForConditionalGeneration` + `AutoProcessor` ({load_seconds:.1f} s).",
        "",
        "## Same answers",
        "",
        f"- Greedy answers identical on **{same} / {len(records)}** easyvqa:test questions "
        f"(batch {BATCH}, left padded; transformers uses the exported processor's pixels and ids).",
        f"- Accuracy: vlmstack {data['accuracy']['vlmstack']['accuracy']:.3f}, "
        f"transformers {data['accuracy']['transformers']['accuracy']:.3f}.",
        f"- Largest logit difference on the first batch (real positions): {logit_diff:.2e}.",
        *older_transformers_lines(data.get("older_transformers")),
        "",
        f"## Generation throughput ({NEW_TOKENS} forced new tokens, 48 prompts, images encoded, tokens/s)",
        "",
        "| | vlmstack | transformers generate | ratio |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Load average (1 min) at the end of the run: {data['load_average_1min']:.1f} on 2 cores; above 2, "
        "other work shared the CPU and the throughput figures are low and noisy.",
        "",
        "The linear projector is checked only by the tiny-model tests (tests/test_hf_llava.py): no "
        "trained model with it is shipped.",
    ]
    write_report("hf_export", "Export to Hugging Face LLaVA", sections, data)
    print(data)


if __name__ == "__main__":
    main()
