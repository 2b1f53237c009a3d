"""VQA benchmark for a shipped (or any) LLaVA/Flamingo model on easyvqa:test.

    .venv/bin/python -m benchmarks.vqa --model llava-easyvqa
    .venv/bin/python -m benchmarks.vqa --model flamingo-easyvqa

Measures: accuracy on all 9,673 test questions and the time that takes (batched); the
same questions with the images re-saved as JPEG/WebP/RGBA/palette PNG at 96-256 px;
generation throughput at batch 16 vs batch 1; the KV cache's speed-up at a 256-token
context; for Flamingo also two-image comparisons (and recalling the first image after one)
and few-shot prompts. Writes docs/benchmarks/vqa-MODEL.md and .json, and the test metrics
into the model's card.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SIZES, VARIANTS, timed, write_report, write_variant
from vlm.data import easyvqa
from vlm.data.interleaved import FIRST_IMAGE_QUESTIONS, PAIR_QUESTIONS, pair_records
from vlm.data.records import VqaRecord
from vlm.data.sources import vqa_records
from vlm.eval.vqa import evaluate_vqa, vqa_metrics
from vlm.generation import GenerationConfig, generate
from vlm.hub import resolve_dir, update_card
from vlm.load import load_vlm


def variant_records(records: list[VqaRecord], workdir: Path) -> dict[str, list[VqaRecord]]:
    images = sorted({r.image for r in records})
    out = {}
    for name, fmt, save_args, mode in VARIANTS:
        folder = workdir / name
        folder.mkdir()
        moved = {}
        for i, image in enumerate(images):
            target = folder / f"{i:05d}.{fmt.lower()}"
            write_variant(image, target, fmt, save_args, mode, SIZES[i % len(SIZES)])
            moved[image] = str(target)
        out[name] = [VqaRecord(moved[r.image], r.question, r.answer) for r in records]
    return out


def generation_throughput(model, batch: int, prompts: int = 48, new_tokens: int = 24) -> float:
    """Generated tokens per second, forcing `new_tokens` per prompt (no early stop)."""
    images = [im.path for im in easyvqa.images("test")[:prompts]]
    sequences = [model.encode([("user", "<image>\nwhat color is the shape?")], generation_prompt=True)[0]] * prompts
    config = GenerationConfig(max_new_tokens=new_tokens)
    model.image_features(images)  # vision features are not what is timed here
    started = time.perf_counter()
    for s in range(0, prompts, batch):
        prompt = model.prepare(sequences[s : s + batch], [[im] for im in images[s : s + batch]])
        for _ in generate(model, prompt, stop_ids=(-1,), pad_id=model.tokenizer.pad_token_id, config=config):
            pass
    return prompts * new_tokens / (time.perf_counter() - started)


def kv_cache_speedup(model, context: int = 256, new_tokens: int = 32) -> dict:
    """Seconds to generate `new_tokens` after a `context`-token prompt, with and without the cache."""
    image = easyvqa.images("test")[0].path
    filler = "is there a red shape in the image? " * 100
    ids = model.encode([("user", f"<image>\n{filler}")], generation_prompt=True)[0]
    head = max(i for i, token in enumerate(ids) if token == model.image_token_id) + 2  # prefix, image, newline
    ids = ids[:head] + ids[-(context - head) :]
    result = {"context_tokens": len(ids), "new_tokens": new_tokens}
    for use_cache in (True, False):
        prompt = model.prepare([ids], [[image]])
        config = GenerationConfig(max_new_tokens=new_tokens, use_cache=use_cache)
        started = time.perf_counter()
        for _ in generate(model, prompt, stop_ids=(-1,), pad_id=model.tokenizer.pad_token_id, config=config):
            pass
        result["with_cache_s" if use_cache else "without_cache_s"] = time.perf_counter() - started
    result["speedup"] = result["without_cache_s"] / result["with_cache_s"]
    return result


def pair_accuracy(model, count: int = 1000) -> tuple[dict, dict]:
    """Two-image comparisons; then, with the right answer in the conversation, "what color
    (shape) is the first shape?", which text after the second image can only answer from
    what the LM carried past it."""
    images = list(easyvqa.images("test"))
    by_path = {im.path: im for im in images}
    records = pair_records(images, count, seed=123)
    questions = [r["conversations"][0]["value"] for r in records]
    answers = [r["conversations"][1]["value"] for r in records]
    attributes = [next(a for a, q in PAIR_QUESTIONS.items() if question.endswith(q)) for question in questions]
    comparisons = [[("user", q)] for q in questions]
    recalls = [
        [("user", q), ("assistant", a), ("user", FIRST_IMAGE_QUESTIONS[t])]
        for q, a, t in zip(questions, answers, attributes)
    ]
    firsts = [getattr(by_path[r["images"][0]], t) for r, t in zip(records, attributes)]
    predictions = {"comparison": [], "recall": []}
    for s in range(0, count, 64):
        pair_images = [r["images"] for r in records[s : s + 64]]
        for kind, conversations in (("comparison", comparisons), ("recall", recalls)):
            predictions[kind] += model.generate_texts(
                conversations[s : s + 64], pair_images, GenerationConfig(max_new_tokens=4)
            )
    return vqa_metrics(predictions["comparison"], answers), vqa_metrics(predictions["recall"], firsts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--update-card", action="store_true", help="developers: record the figures in the shipped model's card"
    )
    parser.add_argument("--model", default="llava-easyvqa")
    parser.add_argument(
        "--fewshot-questions", type=int, default=2000, help="test questions scored with few-shot prompts (Flamingo)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, load_seconds = timed(load_vlm, args.model)
    records = vqa_records("easyvqa:test")
    results = {"model": args.model, "load_seconds": load_seconds}
    results["original"], results["eval_seconds"] = timed(evaluate_vqa, model, records, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in variant_records(records, Path(tmp)).items():
            model._feature_cache.clear()
            results[name] = evaluate_vqa(model, variant, progress=False)
    drops = {name: 100 * (results["original"]["accuracy"] - results[name]["accuracy"]) for name, *_ in VARIANTS}
    results["throughput_tokens_per_s"] = {b: generation_throughput(model, b) for b in (1, 16)}
    results["kv_cache"] = kv_cache_speedup(model)
    flamingo = type(model).__name__ == "FlamingoModel"
    if flamingo:
        results["pairs"], results["first_image_recall"] = pair_accuracy(model)
        pool = vqa_records("easyvqa:train")
        subset = records[:: max(1, len(records) // args.fewshot_questions)][: args.fewshot_questions]
        results["zero_shot_subset"] = evaluate_vqa(model, subset, progress=False)
        results["two_shot_subset"] = evaluate_vqa(model, subset, shots=2, shot_pool=pool, progress=False)

    speed = results["throughput_tokens_per_s"]
    rows = ["| images | accuracy | yes/no | color | shape | drop (points) |", "|---|---|---|---|---|---|"]
    for name in ["original"] + [v[0] for v in VARIANTS]:
        m = results[name]
        t = m["per_answer_type"]
        drop = "" if name == "original" else f"{drops[name]:.2f}"
        rows.append(
            f"| {name} | {m['accuracy']:.4f} | {t['yes/no']:.4f} | {t['color']:.4f} | {t['shape']:.4f} | {drop} |"
        )
    kv = results["kv_cache"]
    sections = [
        f"Model: `{args.model}`. Data: `easyvqa:test`, {results['original']['n']:,} questions on 1,000 images.",
        "",
        "## Accuracy, and the same images in other formats and sizes",
        "",
        f"Variants re-save each test image at a side cycling through {list(SIZES)} px.",
        "",
        *rows,
        "",
        "## Speed",
        "",
        f"- Evaluating all {results['original']['n']:,} questions (batch 64): {results['eval_seconds']:.1f} s "
        f"(+ {results['load_seconds']:.1f} s loading the model).",
        f"- Generation throughput, 48 prompts x 24 forced new tokens: batch 1 {speed[1]:.0f} tokens/s, "
        f"batch 16 {speed[16]:.0f} tokens/s ({speed[16] / speed[1]:.1f}x).",
        f"- KV cache at a {kv['context_tokens']}-token context, {kv['new_tokens']} new tokens: "
        f"{kv['with_cache_s']:.3f} s with the cache, {kv['without_cache_s']:.3f} s recomputing ({kv['speedup']:.1f}x).",
    ]
    if flamingo:
        recall = results["first_image_recall"]["per_answer_type"]
        sections += [
            "",
            "## Flamingo: several images, few-shot prompts",
            "",
            f"- Two-image comparisons from easyvqa:test pairs ('are both shapes the same color/shape?', 1,000 pairs, "
            f"half yes): accuracy {results['pairs']['accuracy']:.4f}.",
            f"- Then, with the right answer in the conversation, 'what color is the first shape?' (or 'what is the first shape?'): "
            f"colour {recall['color']:.4f}, shape {recall['shape']:.4f}. Text after the second image sees only the second image; "
            "the first one's colour or shape reaches it only through the LM's self-attention.",
            f"- Few-shot: on {results['zero_shot_subset']['n']:,} test questions, zero-shot chat prompts {results['zero_shot_subset']['accuracy']:.4f}; "
            f"2-shot prompts with examples from easyvqa:train {results['two_shot_subset']['accuracy']:.4f}.",
        ]
    name = args.model.replace("/", "_")
    write_report(f"vqa-{name}", f"VQA benchmark: {args.model}", sections, {"results": results, "drops_points": drops})
    directory = resolve_dir(args.model)
    if args.update_card and directory:
        update_card(
            directory,
            test_metrics={"data": "easyvqa:test", **results["original"]},
            test_metrics_command=f"python -m benchmarks.vqa --model {args.model}",
        )
    print(
        json.dumps(
            {
                "accuracy": results["original"]["accuracy"],
                "eval_seconds": results["eval_seconds"],
                "worst_drop_points": max(drops.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
