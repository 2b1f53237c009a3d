"""Causal language models: any Hugging Face causal LM, or the tiny Llama-style default.

    model, tokenizer = load_lm("lm-easyvqa")        # shipped name, HF directory or hub id

The tiny default is a Llama architecture (RoPE, grouped-query attention, SwiGLU, RMSNorm,
SDPA attention) with a byte-level BPE tokenizer trained here (`train_tokenizer`); both
are saved with `save_pretrained`, so `AutoModelForCausalLM` / `AutoTokenizer` load them.
Weights load from safetensors only.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from vlm import hub
from vlm.errors import VlmError

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"  # where an image goes in a prompt
CHUNK_END = "<|endofchunk|>"  # ends an interleaved image-text chunk (Flamingo)
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MEDIA_TOKENS = (IMAGE_TOKEN, CHUNK_END)


@dataclass
class TinyLmConfig:
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4  # query heads of 64 dimensions
    kv_heads: int = 2  # grouped-query attention: each key/value head serves 2 query heads
    intermediate_size: int = 768  # SwiGLU hidden width
    max_positions: int = 512  # longest sequence (RoPE needs no table, this is the cap)
    vocab_size: int = 1024  # BPE vocabulary size to train
    rope_theta: float = 10000.0


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with our special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *MEDIA_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(MEDIA_TOKENS),
    )


def build_tiny_lm(config: TinyLmConfig, tokenizer) -> nn.Module:
    """A randomly initialised Llama-style causal LM sized for `tokenizer`."""
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_positions,
        rope_theta=config.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(llama, attn_implementation="sdpa")


def lm_from_config(config: dict, *, code_dir: Path | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """An untrained causal LM from a Hugging Face config dict (weights loaded separately),
    its parameters in `dtype` (default: torch's default, float32).

    A config with an `auto_map` names an LM whose Python code ships with it (e.g. MPT);
    that code is imported from `code_dir` and run, so the caller must have decided to
    trust it (see `remote_code_files`).
    """
    config = dict(config)
    if "auto_map" not in config:
        return AutoModelForCausalLM.from_config(
            AutoConfig.for_model(config.pop("model_type"), **config), attn_implementation="sdpa", dtype=dtype
        )
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    if code_dir is None:
        raise VlmError(f"the {config.get('model_type')} language model needs its Python files, and none were given")
    try:
        classes = {
            auto: get_class_from_dynamic_module(local_reference(config["auto_map"][auto]), str(code_dir))
            for auto in ("AutoConfig", "AutoModelForCausalLM")
        }
    except ImportError as e:  # the code needs packages that are not installed (transformers names them)
        raise VlmError(f"{code_dir}: the language model's code cannot be imported ({str(e).splitlines()[0]})") from None
    hf_config = classes["AutoConfig"].from_dict(config)
    return classes["AutoModelForCausalLM"]._from_config(hf_config, attn_implementation="sdpa", dtype=dtype)


def local_reference(reference: str) -> str:
    """An auto_map class reference ("module.Class", or "org/repo--module.Class" for code
    kept in another repository) as the module in the model's own directory."""
    return reference.split("--")[-1]


def remote_code_files(config: dict) -> list[str]:
    """The Python files an LM config's auto_map names (empty for an LM transformers ships)."""
    references = []
    for value in dict(config.get("auto_map") or {}).values():
        references += value if isinstance(value, (list, tuple)) else [value]
    modules = {local_reference(r).rsplit(".", 1)[0] for r in references if isinstance(r, str)}
    return sorted(m.replace(".", "/") + ".py" for m in modules)


def load_lm(spec: str, *, trust_remote_code: bool = False) -> tuple[nn.Module, PreTrainedTokenizerFast]:
    """(model, tokenizer) from a shipped name, a Hugging Face model directory, or a hub id.
    `trust_remote_code` runs Python code the checkpoint ships (e.g. MPT): only for trusted sources.

    Raises:
        VlmError: not found, or not loadable from safetensors.
    """
    directory = hub.resolve_dir(spec)
    source = str(directory) if directory else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            use_safetensors=True,
            dtype=torch.float32,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:
        names = ", ".join(hub.shipped_names()) or "none"
        raise VlmError(f"cannot load language model {spec!r} ({str(e).splitlines()[0]}); shipped: {names}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def check_max_length(lm: nn.Module, max_length: int) -> None:
    """Raises VlmError when sequences of `max_length` tokens exceed the LM's positions."""
    if max_length > getattr(lm.config, "max_position_embeddings", max_length):
        raise VlmError(f"max_length {max_length} exceeds the LM's {lm.config.max_position_embeddings} positions")


def add_media_tokens(model: nn.Module, tokenizer, tokens: tuple[str, ...] = MEDIA_TOKENS) -> list[int]:
    """Make sure the tokenizer knows `tokens` (<image> and <|endofchunk|>), adding rows to the
    model's embeddings if needed; returns their ids."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(list(tokens))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of any HF causal LM (model.model.layers for Llama and
    Mixtral, model.transformer.h for GPT-2, ...): the ModuleList as long as the config says."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise VlmError(f"cannot find the {count} decoder layers of {type(model).__name__}")
