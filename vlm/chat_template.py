"""The chat template both visual language models use, and its tokenisation.

    USER: <image>
    what color is the shape?
    ASSISTANT: red</s>
    USER: and its shape?
    ASSISTANT: circle</s>

A conversation is a list of (role, text) turns, role "user" or "assistant" (LLaVA's
"human"/"gpt" map onto them); it starts with the tokenizer's <s> if its texts do. Training labels cover only the assistant's words and the
end-of-sequence token; everything else is IGNORE_INDEX.

A Hugging Face checkpoint brings its own Jinja template (`encode_with_template`): its
messages are lists of parts ({"type": "image"}, {"type": "text", "text": ...}), the text
between the user's <image> markers; that is for answering only (no training labels).
"""

from dataclasses import dataclass

IGNORE_INDEX = -100  # label ignored by the loss
ROLES = {"user": "USER:", "assistant": "ASSISTANT:"}
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where nothing is learnt


def start_ids(tokenizer) -> list[int]:
    """The token a tokenizer puts before every text: [<s>] for Llama's (whose models
    expect it), [] for GPT-2's and ours."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("")["input_ids"][:1] == [bos] else []


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, turns: list[tuple[str, str]], *, generation_prompt: bool = False) -> Encoded:
    """Token ids and labels of a conversation.

    Args:
        turns: (role, text) pairs, roles alternating from "user".
        generation_prompt: end with "ASSISTANT:" for the model to continue (the last turn
            must then be the user's).
    """
    ids = start_ids(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for role, text in turns:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
        if role == "user":
            piece = _encode(tokenizer, f"{ROLES['user']} {text}\n")
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
        else:
            prefix = _encode(tokenizer, ROLES["assistant"])
            answer = _encode(tokenizer, f" {text.strip()}") + [tokenizer.eos_token_id]
            newline = _encode(tokenizer, "\n")
            ids += prefix + answer + newline
            labels += [IGNORE_INDEX] * len(prefix) + answer + [IGNORE_INDEX] * len(newline)
    if generation_prompt:
        prefix = _encode(tokenizer, ROLES["assistant"])
        ids += prefix
        labels += [IGNORE_INDEX] * len(prefix)
    return Encoded(ids, labels)


def template_messages(turns: list[tuple[str, str]]) -> list[dict]:
    """(role, text) turns -> Hugging Face chat messages: each <image> marker an image part,
    the text around it text parts, in order."""
    from vlm.lm import IMAGE_TOKEN

    messages = []
    for role, text in turns:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
        parts = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": parts})
    return messages


def encode_with_template(
    tokenizer, template: str, turns: list[tuple[str, str]], *, generation_prompt: bool = False
) -> Encoded:
    """Token ids of a conversation rendered by a checkpoint's Jinja chat template (labels all
    IGNORE_INDEX). The tokenizer's start token is added unless the template writes it, as
    transformers' processors do."""
    text = tokenizer.apply_chat_template(
        template_messages(turns), chat_template=template, add_generation_prompt=generation_prompt, tokenize=False
    )
    bos = tokenizer.bos_token
    ids = ([] if bos and text.startswith(bos) else start_ids(tokenizer)) + _encode(tokenizer, text)
    return Encoded(ids, [IGNORE_INDEX] * len(ids))


def encode_fewshot(tokenizer, examples: list[tuple[str, str]], question: str | None) -> Encoded:
    """Flamingo's few-shot format: "<image>Question: q Answer: a<|endofchunk|>" per
    example, then "<image>Question: q Answer:" for the query (if given). Labels cover
    the answers and their <|endofchunk|>."""
    from vlm.lm import CHUNK_END, IMAGE_TOKEN

    chunk_end = tokenizer.convert_tokens_to_ids(CHUNK_END)
    ids = start_ids(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for q, a in examples:
        prompt = _encode(tokenizer, f"{IMAGE_TOKEN}Question: {q} Answer:")
        answer = _encode(tokenizer, f" {a.strip()}") + [chunk_end]
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    if question is not None:
        prompt = _encode(tokenizer, f"{IMAGE_TOKEN}Question: {question} Answer:")
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
    return Encoded(ids, labels)


def from_llava(record: dict) -> list[tuple[str, str]]:
    """Turns of a LLaVA-format conversation record ({"conversations": [{"from", "value"}]})."""
    try:
        return [(LLAVA_ROLES[turn["from"]], turn["value"]) for turn in record["conversations"]]
    except KeyError as e:
        raise ValueError(f"conversation {record.get('id', '?')}: unknown or missing field {e}") from None
