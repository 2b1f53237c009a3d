"""Greedy answers of an exported HF LLaVA checkpoint under another transformers (e.g. 4.57), for
benchmarks/hf_export.py, which runs this in a subprocess with that transformers first on PYTHONPATH.

    PYTHONPATH=/tmp/tf457 .venv/bin/python -m benchmarks.hf_export_transformers4 REQUEST.json

REQUEST.json: {"checkpoint", "images": [paths], "questions": [...], "batch", "max_new_tokens"}.
Prints one JSON line: {"transformers", "loading_info", "answers"}. Imports nothing of vlmstack,
which needs transformers 5.
"""

import json
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


def answers(model, processor, images, questions, max_new_tokens: int) -> list[str]:
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return [
        t.strip() for t in processor.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def main() -> None:
    request = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(2)
    model, info = LlavaForConditionalGeneration.from_pretrained(request["checkpoint"], output_loading_info=True)
    processor = AutoProcessor.from_pretrained(request["checkpoint"])
    images = [Image.open(path).convert("RGB") for path in request["images"]]
    questions, step = request["questions"], request["batch"]
    found = []
    for s in range(0, len(questions), step):
        found += answers(
            model.eval(), processor, images[s : s + step], questions[s : s + step], request["max_new_tokens"]
        )
    loading = {key: sorted(map(str, value)) for key, value in info.items()}
    print(json.dumps({"transformers": transformers.__version__, "loading_info": loading, "answers": found}))


if __name__ == "__main__":
    main()
