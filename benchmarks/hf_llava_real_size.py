"""Real-size HF LLaVA: vlmstack vs transformers on a random-weights llava-interleave-qwen-0.5b-hf.

    .venv/bin/python -m benchmarks.hf_llava_real_size [--checkpoint DIR] [--dtype bfloat16|float32] [--transformers-only]

The checkpoint is built once (into --checkpoint, reused by later runs) from the exact hub
config of llava-hf/llava-interleave-qwen-0.5b-hf (SigLIP-so400m tower, Qwen1.5-0.5B-Chat LM),
with random weights stored as the hub stores them (bfloat16 safetensors, hub key layout), the
hub's preprocessor, processor, chat template and generation config, and a stand-in tokenizer
(no hub here) whose special tokens have the real ids and whose length leaves the real
vocabulary's spare rows. Speed does not depend on the weights' values.

Measured, vlmstack (`load_vlm(DIR, dtype=...)`) vs transformers
(`LlavaForConditionalGeneration.from_pretrained(DIR, dtype=...)`), alternating, medians:
- load seconds and resident memory growth, each load in a fresh subprocess;
- prefill: one image + one question to the first generated token (processor/transform,
  vision tower, projector, LM prefill);
- decode tokens/s at batch 1 and 8 (one different image per row, NEW_TOKENS forced new
  tokens; decode = the steps after the first token);
- the memory-bandwidth bound of decoding: bytes of LM weights read per token vs a measured
  copy bandwidth.
Writes docs/benchmarks/hf_llava_real_size.md and .json.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Other jobs share this machine's 2 cores. With OpenMP's default (spinning) wait, a 2-thread
# op then waits out scheduler quanta: a 1x1024 @ 1024x2816 bfloat16 linear measured 16 ms
# instead of 0.4 ms at load average 6. Passive waiting (set before torch starts OpenMP; the
# load subprocesses inherit it) keeps both libraries' timings about the code, not the neighbours.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.common import ROOT, write_report  # noqa: E402

CHECKPOINT = Path("/tmp/llava-interleave-qwen-0.5b-random")
HUB = "https://huggingface.co/llava-hf/llava-interleave-qwen-0.5b-hf"
NEW_TOKENS = 32  # forced, for decode throughput
BATCHES = (1, 8)
REPEATS = 3
BATCH_REPEATS = {1: REPEATS, 8: 2}  # a batch-8 run takes ~100 s a side here: two each, mean of two
QUESTIONS = [
    "What is shown in this picture?",
    "Describe the image in detail.",
    "What colour is the largest shape?",
    "How many objects are there?",
    "Is there any text in the image?",
    "Where was this photo taken?",
    "What is the object in the middle?",
    "Write a short caption for this image.",
]

# Where each file below was found (the hub pages as stored by the search index).
SOURCES = {
    "config.json": f"{HUB}/blame/187fe5ebba14c29a67f99fe56f3351b058af3e10/config.json (the final "
    '`"vision_feature_select_strategy": "full"` is cut off there; taken from the sibling '
    "llava-hf/llava-interleave-qwen-7b-hf config.json, blame 0a3fa472, and the 0.5b processor_config.json "
    'commit "Fix vision_feature_select_strategy")',
    "generation_config.json": f"{HUB}/blob/refs%2Fpr%2F6/generation_config.json",
    "preprocessor_config.json": f"{HUB}/blob/187fe5ebba14c29a67f99fe56f3351b058af3e10/preprocessor_config.json",
    "chat_template.json": f"{HUB}/blob/1abeb3a994bf01d53d492318a1c9517950cd9f1b/chat_template.json",
    "added_tokens.json": f"{HUB}/blob/6864c655be396f87b4bb9031cc2b1ae3209520e8/added_tokens.json",
    "processor_config.json": f"{HUB}/tree/main lists it (169 bytes, 'Fix vision_feature_select_strategy'); its "
    "content was not found, so it is reconstructed: patch_size 14, strategy full, no additional image tokens",
}

# config.json as on the hub (see SOURCES).
CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 151646,
    "model_type": "llava",
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "Qwen/Qwen1.5-0.5B-Chat",
        "architectures": ["Qwen2ForCausalLM"],
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "max_position_embeddings": 32768,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 152000,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "vision_config": {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "layer_norm_eps": 1e-06,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "patch_size": 14,
        "vision_use_head": False,
    },
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 151643, "eos_token_id": 151645}
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
PROCESSOR_CONFIG = {
    "image_token": "<image>",
    "num_additional_image_tokens": 0,  # SigLIP has no CLS token
    "patch_size": 14,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "full",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# added_tokens.json: Qwen's BPE has 151643 tokens; these follow it.
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646}


# --- the checkpoint ----------------------------------------------------------------------------


def stand_in_tokenizer():
    """A byte-level BPE (a few merges learnt from the questions) padded with unreachable filler
    entries to Qwen's 151643 BPE tokens, then the real special tokens at their real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(QUESTIONS * 20, trainer)
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    first_special = min(SPECIAL_TOKENS.values())
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), first_special)})
    bpe = Tokenizer.from_str(json.dumps(spec))
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<image>"],
        padding_side="left",
    )
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} == SPECIAL_TOKENS
    return tokenizer


def hub_key(key: str) -> str:
    """A transformers 5 state-dict key in the layout of the hub's model.safetensors (4.43)."""
    for ours, hubs in (
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if key.startswith(ours):
            return hubs + key.removeprefix(ours)
    raise ValueError(f"unexpected key {key}")


def build_checkpoint(directory: Path) -> None:
    """Write the random-weights checkpoint (see the module docstring) unless it is there."""
    from safetensors.torch import save_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if (directory / "model.safetensors").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(**CONFIG)).to(torch.bfloat16)
    state = {hub_key(k): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(directory / "model.safetensors.tmp"), metadata={"format": "pt"})
    for name, content in (
        ("config.json", CONFIG),
        ("generation_config.json", GENERATION_CONFIG),
        ("preprocessor_config.json", PREPROCESSOR_CONFIG),
        ("processor_config.json", PROCESSOR_CONFIG),
        ("chat_template.json", {"chat_template": CHAT_TEMPLATE}),
    ):
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")
    stand_in_tokenizer().save_pretrained(str(directory))
    os.replace(directory / "model.safetensors.tmp", directory / "model.safetensors")  # complete last


# --- loading, each in a fresh process ------------------------------------------------------------


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def vlmstack_refusal(directory: Path, dtype: torch.dtype) -> str | None:
    """The one-line error with which load_vlm refuses the checkpoint, or None when it loads."""
    try:
        load_ours(directory, dtype)
    except Exception as e:  # noqa: BLE001 (any refusal is reported, whatever its type)
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def load_ours(directory: Path, dtype: torch.dtype):
    from vlm.load import load_vlm

    return load_vlm(str(directory), dtype=str(dtype).removeprefix("torch."))


def load_theirs(directory: Path, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(directory), dtype=dtype).eval()


LOADERS = {"vlmstack": load_ours, "transformers": load_theirs}


def load_worker(loader: str, directory: Path, dtype: torch.dtype) -> None:
    """Prints one load's {seconds, rss_growth, used_rss_growth, peak_rss_growth}, imports
    excluded. A loader that maps the file reads the weights only when they are first used, so
    resident memory is also taken after one answer (one image, NEW_TOKENS tokens)."""
    import transformers  # noqa: F401 (imported before the baseline)

    import vlm.hf_import  # noqa: F401
    import vlm.load  # noqa: F401

    torch.set_num_threads(2)
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    model = LOADERS[loader](directory, dtype)
    seconds = time.perf_counter() - started
    gc.collect()
    loaded = rss_bytes()
    if loader == "vlmstack":
        ours_run(model, pictures(1), QUESTIONS[:1])
    else:
        from transformers import AutoProcessor

        theirs_run(model, AutoProcessor.from_pretrained(str(directory)), pictures(1), QUESTIONS[:1])
    gc.collect()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_growth": loaded - before,
                "used_rss_growth": rss_bytes() - before,
                "peak_rss_growth": rss_bytes("VmHWM") - before,
            }
        )
    )


def measure_loads(directory: Path, dtype_name: str, loaders: list[str], repeats: int = REPEATS) -> dict:
    """Per loader, the runs of `repeats` fresh subprocesses (alternating loaders) and their medians."""
    runs = {name: [] for name in loaders}
    for _ in range(repeats):
        for name in loaders:
            command = [sys.executable, "-m", "benchmarks.hf_llava_real_size", "--load-worker", name]
            command += ["--checkpoint", str(directory), "--dtype", dtype_name]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"{name} load failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {name: {**median_of(r), "runs": r} for name, r in runs.items()}


def median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


# --- bandwidth bound -----------------------------------------------------------------------------


def copy_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes/s of a large tensor copy, counting bytes read + written (as STREAM's copy), median."""
    source = torch.ones(int(gib * 2**30), dtype=torch.uint8)
    target = torch.empty_like(source)
    target.copy_(source)  # touch the pages
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - started)
    return 2 * source.numel() / statistics.median(times)


def lm_bytes_per_token(model) -> int:
    """Bytes of LM weights one decode step reads: every decoder layer and the final norm, plus
    the lm_head (tied to the embedding matrix, so that matrix counted once; the embedding lookup
    reads one row)."""
    lm = model.model.language_model
    return sum(p.numel() * p.element_size() for p in lm.parameters())  # tied: embed_tokens == lm_head


# --- generation ----------------------------------------------------------------------------------


def pictures(count: int) -> list[Image.Image]:
    """Distinct 640x480 pictures (each row encodes its own image)."""
    result = []
    for i in range(count):
        image = Image.new("RGB", (640, 480), (40 + 20 * i, 120, 200 - 15 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse((60 + 30 * i, 80, 300 + 20 * i, 360), fill=(230, 60 + 20 * i, 40))
        draw.rectangle((380, 100 + 10 * i, 600, 300), fill=(30, 200, 90 + 15 * i))
        result.append(image)
    return result


class StepTimes:
    """A transformers streamer that notes when each generated token arrives (its first put
    is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def theirs_run(model, processor, images, questions) -> tuple[float, float]:
    """(seconds to the first token, seconds of the remaining NEW_TOKENS - 1 steps) of transformers'
    generate, processor included."""
    started = time.perf_counter()
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    streamer = StepTimes()
    with torch.inference_mode():
        model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            streamer=streamer,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    tokens = streamer.times[1:]  # [0] is the prompt
    assert len(tokens) == NEW_TOKENS, len(tokens)
    return tokens[0] - started, tokens[-1] - tokens[0]


def ours_run(model, images, questions) -> tuple[float, float]:
    """(seconds to the first token, seconds of the remaining steps) of vlmstack's generation,
    image transform and encoding included (its feature cache emptied first)."""
    from vlm.generation import GenerationConfig, generate

    model.__dict__.pop("_feature_cache", None)
    started = time.perf_counter()
    sequences = [model.encode([("user", f"<image>\n{q}")], generation_prompt=True)[0] for q in questions]
    prompt = model.prepare(sequences, [[image] for image in images])
    times = []
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    for _ in generate(model, prompt, stop_ids=(-1,), pad_id=model.tokenizer.pad_token_id, config=config):
        times.append(time.perf_counter())
    assert len(times) == NEW_TOKENS, len(times)
    return times[0] - started, times[-1] - times[0]


def prompt_lengths(ours, theirs_processor) -> dict:
    """LM sequence length of one image + QUESTIONS[0] as each side builds it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    text = theirs_processor.apply_chat_template(messages, add_generation_prompt=True)
    lengths = {"transformers": len(theirs_processor(images=pictures(1), text=[text])["input_ids"][0])}
    if ours is not None:
        lengths["vlmstack"] = len(ours.encode([("user", f"<image>\n{QUESTIONS[0]}")], generation_prompt=True)[0])
    return lengths


def measure_generation(ours, theirs, processor, batches: tuple[int, ...] = BATCHES) -> dict:
    """Per batch size and side: medians of BATCH_REPEATS runs (after one warm-up), alternating."""
    images = pictures(max(batches))
    sides = {"transformers": lambda im, q: theirs_run(theirs, processor, im, q)}
    if ours is not None:
        sides = {"vlmstack": lambda im, q: ours_run(ours, im, q), **sides}
    for run in sides.values():
        run(images[:1], QUESTIONS[:1])  # warm-up
    result = {}
    for batch in batches:
        runs = {name: [] for name in sides}
        for _ in range(BATCH_REPEATS[batch]):
            for name, run in sides.items():
                runs[name].append(run(images[:batch], QUESTIONS[:batch]))
                print(batch, name, runs[name][-1], flush=True)
        result[f"batch_{batch}"] = {
            name: {
                "first_token_seconds": statistics.median(first for first, _ in r),
                "decode_tokens_per_second": statistics.median(batch * (NEW_TOKENS - 1) / rest for _, rest in r),
                "runs": r,
            }
            for name, r in runs.items()
        }
    return result


# --- the report ----------------------------------------------------------------------------------


def fmt_ratio(data: dict, key: str, batch: str) -> str:
    sides = data["generation"][batch]
    if "vlmstack" not in sides:
        return "n/a"
    return f"{sides['vlmstack'][key] / sides['transformers'][key]:.2f}x"


def float32_lines(float32: dict | None, sides: list[str]) -> list[str]:
    """The float32 batch-1 section, [] when it was not run."""
    if float32 is None:
        return []
    loads, gen = float32["loads"], float32["generation"]["batch_1"]
    rows = [
        ("load (s)", lambda s: f"{loads[s]['seconds']:.1f}"),
        ("resident memory growth after one answer (GiB)", lambda s: f"{loads[s]['used_rss_growth'] / 2**30:.2f}"),
        ("peak resident memory growth, load + answer (GiB)", lambda s: f"{loads[s]['peak_rss_growth'] / 2**30:.2f}"),
        ("prefill, 1 image + question, to first token (s)", lambda s: f"{gen[s]['first_token_seconds']:.2f}"),
        ("decode tokens/s, batch 1", lambda s: f"{gen[s]['decode_tokens_per_second']:.1f}"),
        (
            "decode, fraction of the float32 bound",
            lambda s: f"{gen[s]['decode_tokens_per_second'] / float32['bound_tokens_per_second']:.2f}",
        ),
    ]
    return [
        f"## float32 (batch 1 only; loads: one each; bound {float32['bound_tokens_per_second']:.1f} tokens/s)",
        "",
        "| | " + " | ".join(sides) + " |",
        "|---" * (len(sides) + 1) + "|",
        *["| " + name + " | " + " | ".join(value(s) for s in sides) + " |" for name, value in rows],
        "",
    ]


def refusal_lines(data: dict) -> list[str]:
    """What vlmstack said about the checkpoint when it did not simply load it."""
    if data["transformers_only"]:
        reason = (
            f"vlmstack refused the checkpoint: `{data['vlmstack_refusal']}`"
            if data["vlmstack_refusal"]
            else ("run with --transformers-only")
        )
        return [f"**Transformers only** ({reason}).", ""]
    return []


def report(data: dict, dtype_name: str, transformers_only: bool) -> list[str]:
    gen, loads, bound = data["generation"], data["loads"], data["bandwidth_bound"]
    sides = ["vlmstack", "transformers"] if not transformers_only else ["transformers"]

    def cell(side, value):
        return value(side) if side in gen["batch_1"] else "n/a"

    rows = [
        ("load (s)", lambda s: f"{loads[s]['seconds']:.1f}"),
        ("resident memory growth after load (GiB)", lambda s: f"{loads[s]['rss_growth'] / 2**30:.2f}"),
        ("resident memory growth after one answer (GiB)", lambda s: f"{loads[s]['used_rss_growth'] / 2**30:.2f}"),
        ("peak resident memory growth, load + answer (GiB)", lambda s: f"{loads[s]['peak_rss_growth'] / 2**30:.2f}"),
        (
            "prefill, 1 image + question, to first token (s)",
            lambda s: f"{gen['batch_1'][s]['first_token_seconds']:.2f}",
        ),
        *[
            (f"decode tokens/s, batch {b}", lambda s, b=b: f"{gen[f'batch_{b}'][s]['decode_tokens_per_second']:.1f}")
            for b in BATCHES
        ],
        ("prefill, batch 8, to first token (s)", lambda s: f"{gen['batch_8'][s]['first_token_seconds']:.1f}"),
    ]
    table = ["| | " + " | ".join(sides) + " |", "|---" * (len(sides) + 1) + "|"]
    table += ["| " + name + " | " + " | ".join(cell(s, value) for s in sides) + " |" for name, value in rows]
    ours_b1 = gen["batch_1"].get("vlmstack", {}).get("decode_tokens_per_second")
    theirs_b1 = gen["batch_1"]["transformers"]["decode_tokens_per_second"]
    fraction = (
        f"vlmstack batch-1 decode is **{ours_b1 / bound['tokens_per_second']:.2f}x** the bound"
        if ours_b1
        else "vlmstack: not measured in this run"
    )
    goals = []
    if not transformers_only:
        goals = [
            "## Against the targets of issue 24",
            "",
            f"- Decode at batch 1: vlmstack / transformers = {fmt_ratio(data, 'decode_tokens_per_second', 'batch_1')} "
            "(goal >= 1x).",
            f"- Decode at batch 8: vlmstack / transformers = {fmt_ratio(data, 'decode_tokens_per_second', 'batch_8')} "
            "(goal >= 1.5x).",
            f"- Decode at batch 1 vs the bandwidth bound: {ours_b1 / bound['tokens_per_second']:.2f}x (goal >= 0.5x).",
            "",
        ]
    return [
        "A random-weights `LlavaForConditionalGeneration` built from the exact config of "
        f"[llava-hf/llava-interleave-qwen-0.5b-hf]({HUB}): SigLIP-so400m-patch14-384 tower (26 layers, "
        "width 1152, 729 patch tokens per 384x384 image, `vision_feature_layer` -1, select strategy full), "
        "gelu projector, Qwen1.5-0.5B-Chat LM (24 layers, width 1024, 16 heads, vocabulary 152000, tied "
        f"embeddings); {data['parameters'] / 1e9:.2f} B parameters stored in bfloat16 in the hub's key layout "
        f"({data['checkpoint_bytes'] / 2**30:.2f} GiB). Compute dtype **{dtype_name}** for both "
        f"({data['dtype_reason']}). Tokens of one image + question in the LM: {data['prompt_tokens']}. "
        f"vlmstack at commit {data['vlmstack_commit']}"
        + (f" with uncommitted changes in {data['vlmstack_uncommitted']}" if data["vlmstack_uncommitted"] else "")
        + ".",
        "",
        *refusal_lines(data),
        f"## Side by side ({NEW_TOKENS} forced new tokens; medians of {REPEATS} runs, batch 8: of "
        f"{BATCH_REPEATS[8]}; the two sides alternate)",
        "",
        *table,
        "",
        "Loads: each in a fresh subprocess, imports done before the baseline; resident memory growth "
        "is VmRSS minus VmRSS before the load (the checkpoint file is in the page cache), right after it and after one answer (one image, "
        f"{NEW_TOKENS} tokens): a loader that maps the safetensors file (transformers, when the stored "
        "dtype is the compute dtype) reads the weights' pages only at first use, so its load time is "
        "short and that cost moves into the first answer. Prefill: from the raw PIL image and question to the first generated "
        "token (processor or transform, vision tower, projector, LM prefill, first logits). Decode "
        f"tokens/s: batch x {NEW_TOKENS - 1} tokens over the time from the first token to the last "
        "(prefill excluded). Each row of a batch has its own 640x480 picture and question.",
        "",
        "## Memory-bandwidth bound of decoding",
        "",
        f"- Bytes of weights read per decoded token: **{bound['bytes_per_token'] / 1e9:.3f} GB** = the LM's "
        f"{bound['lm_parameters'] / 1e6:.1f} M parameters in {dtype_name}: 24 decoder layers and the final norm, "
        "plus the lm_head (tied to the embedding matrix, which is counted once: the embedding lookup reads one "
        "row). The KV cache of the ~750-token prompt (24 layers x 2 x 1024 values per token, "
        f"{bound['kv_cache_bytes_per_row'] / 1e6:.0f} MB per row) is read too and not counted.",
        f"- Copy bandwidth: **{bound['copy_bandwidth'] / 1e9:.1f} GB/s** (1 GiB torch tensor copy, median of 10, "
        "bytes read + written, 2 threads) at the start of the run; "
        f"{bound['copy_bandwidth_after_decoding'] / 1e9:.1f} GB/s measured again right after the decode runs, "
        f"under the load they had (a bound of {bound['copy_bandwidth_after_decoding'] / bound['bytes_per_token']:.1f} "
        "tokens/s).",
        f"- Bound: {bound['copy_bandwidth'] / 1e9:.1f} / {bound['bytes_per_token'] / 1e9:.3f} = "
        f"**{bound['tokens_per_second']:.1f} tokens/s** at batch 1. {fraction}; transformers' is "
        f"{theirs_b1 / bound['tokens_per_second']:.2f}x.",
        "",
        *goals,
        *float32_lines(data["float32"], sides),
        "## Where the configuration comes from",
        "",
        *[f"- `{name}`: {where}" for name, where in SOURCES.items()],
        "- Tokenizer: the real Qwen tokenizer cannot be downloaded here. A stand-in byte-level BPE has the "
        "same size (151643 BPE entries, mostly unreachable fillers) and the real special tokens at their "
        "ids (`<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645, `<image>` 151646); it "
        "splits text into more tokens than Qwen's would, which lengthens the question by a few tokens next "
        "to the 729 image tokens.",
        "",
        f"Load average (1 min) at the start and end of the run: {data['load_average_1min_at_start']:.1f}, "
        f"{data['load_average_1min']:.1f} on 2 cores; above 2, other "
        "work shared the CPU and the timings are low and noisy. OpenMP threads wait passively "
        f"(`OMP_WAIT_POLICY={data['omp_wait_policy']}`, see the script).",
    ]


def float32_batch_1(directory: Path, loaders: list[str], processor, bound: float) -> dict:
    """The same comparison in float32, shorter: one load each, batch 1 only."""
    loads = measure_loads(directory, "float32", loaders, repeats=1)
    theirs = load_theirs(directory, torch.float32)
    ours = load_ours(directory, torch.float32) if "vlmstack" in loaders else None
    return {
        "loads": loads,
        "generation": measure_generation(ours, theirs, processor, batches=(1,)),
        "bound_tokens_per_second": bound,  # twice the bytes per token of bfloat16
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="built here once, then reused")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 where native")
    parser.add_argument("--transformers-only", action="store_true", help="skip vlmstack (before it loads SigLIP)")
    parser.add_argument("--no-float32", action="store_true", help="skip the float32 batch-1 comparison")
    parser.add_argument("--load-worker", choices=tuple(LOADERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from vlm.train.trainer import native_bf16

    if args.dtype:
        dtype_name, reason = args.dtype, "chosen with --dtype"
    elif native_bf16():
        dtype_name, reason = "bfloat16", "this CPU computes bfloat16 natively: `vlm.train.trainer.native_bf16()`"
    else:
        dtype_name, reason = "float32", "this CPU has no native bfloat16"
    dtype = getattr(torch, dtype_name)
    if args.load_worker:
        load_worker(args.load_worker, args.checkpoint, dtype)
        return
    torch.set_num_threads(2)
    load_at_start = os.getloadavg()[0]
    build_checkpoint(args.checkpoint)
    from transformers import AutoProcessor

    refusal = None if args.transformers_only else vlmstack_refusal(args.checkpoint, dtype)
    transformers_only = args.transformers_only or refusal is not None
    loaders = ["transformers"] if transformers_only else ["vlmstack", "transformers"]
    bandwidth = copy_bandwidth()
    loads = measure_loads(args.checkpoint, dtype_name, loaders)
    processor = AutoProcessor.from_pretrained(str(args.checkpoint))
    processor.tokenizer.padding_side = "left"
    theirs = load_theirs(args.checkpoint, dtype)
    ours = None if transformers_only else load_ours(args.checkpoint, dtype)
    generation = measure_generation(ours, theirs, processor)
    bandwidth_after = copy_bandwidth()  # again, under whatever else shared the CPU while decoding
    per_token = lm_bytes_per_token(theirs)
    parameters = sum(p.numel() for p in theirs.parameters())
    lm_parameters = sum(p.numel() for p in theirs.model.language_model.parameters())
    prompt_tokens = prompt_lengths(ours, processor)
    float32 = None
    if dtype_name == "bfloat16" and not args.no_float32:
        del ours, theirs
        gc.collect()
        float32 = float32_batch_1(args.checkpoint, loaders, processor, bandwidth / (2 * per_token))
    text = CONFIG["text_config"]
    data = {
        "checkpoint": str(args.checkpoint),
        "dtype": dtype_name,
        "dtype_reason": reason,
        "transformers_only": transformers_only,
        "vlmstack_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "vlmstack_uncommitted": subprocess.run(  # the working tree is shared with other work
            ["git", "status", "--short", "--", "vlm"], capture_output=True, text=True, cwd=ROOT
        ).stdout.split("\n")[:-1],
        "vlmstack_refusal": refusal,
        "sources": SOURCES,
        "parameters": parameters,
        "checkpoint_bytes": (args.checkpoint / "model.safetensors").stat().st_size,
        "prompt_tokens": prompt_tokens,
        "new_tokens": NEW_TOKENS,
        "repeats": REPEATS,
        "loads": loads,
        "generation": generation,
        "bandwidth_bound": {
            "bytes_per_token": per_token,
            "lm_parameters": lm_parameters,
            "kv_cache_bytes_per_row": 750 * text["num_hidden_layers"] * 2 * text["hidden_size"] * dtype.itemsize,
            "copy_bandwidth": bandwidth,
            "copy_bandwidth_after_decoding": bandwidth_after,
            "tokens_per_second": bandwidth / per_token,
        },
        "float32": float32,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_1min_at_start": load_at_start,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine makes the timings noisy
    }
    title = "Real-size HF LLaVA (llava-interleave-qwen-0.5b shape): vlmstack vs transformers"
    write_report("hf_llava_real_size", title, report(data, dtype_name, transformers_only), data)
    print(json.dumps({k: data[k] for k in ("loads", "generation", "bandwidth_bound")}, indent=1, default=str))


if __name__ == "__main__":
    main()
