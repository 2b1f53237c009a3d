"""`hf:ORG/NAME` model specs: download a Hugging Face hub repository into the normal
Hugging Face cache (with progress bars) and hand back its directory.

    load_vlm("hf:llava-hf/llava-interleave-qwen-0.5b-hf")

Only weights as safetensors, JSON configs, chat templates and tokenizer files are
fetched: never pickled weights (.bin, .pt, .pth, .pkl), which would run code on load.
Offline (HF_HUB_OFFLINE=1) a repository already in the cache is used as it is; anything
else fails in one line saying how to pass a directory downloaded elsewhere.
"""

import logging
import os
import re
from pathlib import Path

from vlm.errors import VlmError

log = logging.getLogger(__name__)

PREFIX = "hf:"
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "tokenizer.model"]
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_spec(spec) -> bool:
    """True for an `hf:ORG/NAME` spec."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now; huggingface_hub reads it only at import."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any(f and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def download(spec: str) -> Path:
    """The local directory of the repository an `hf:ORG/NAME` spec names, downloaded into
    the Hugging Face cache unless it is there already.

    Raises:
        VlmError: a malformed name, or the download failed (offline, unknown or gated
            repository, network error): one line with the way around it.
    """
    repo = spec.removeprefix(PREFIX)
    if not REPO_ID.fullmatch(repo):
        raise VlmError(f"{spec!r}: write a Hugging Face model as hf:ORG/NAME, e.g. hf:llava-hf/llava-1.5-7b-hf")
    from huggingface_hub import snapshot_download

    is_offline = offline()
    if not is_offline:
        log.info("downloading %s into the Hugging Face cache (safetensors, configs, tokenizer)", repo)
    try:
        path = snapshot_download(repo, allow_patterns=ALLOW_PATTERNS, local_files_only=is_offline)
    except Exception as e:  # the hub client raises HTTP, network, file and validation errors
        raise VlmError(
            f"cannot download {repo} ({failure_reason(e, is_offline)}); download it where there is internet "
            f"(`hf download {repo} --local-dir DIR`) and pass --model DIR"
        ) from None
    return Path(path)


def failure_reason(error: Exception, is_offline: bool) -> str:
    """A few words on why a download failed."""
    from huggingface_hub import errors

    if is_offline:
        return "offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache"
    if isinstance(error, errors.GatedRepoError):
        return "a gated repository: accept its terms on huggingface.co, then `hf auth login`"
    if isinstance(error, errors.RepositoryNotFoundError):
        return "no such repository, or a private one"
    if isinstance(error, errors.LocalEntryNotFoundError):
        return "the Hugging Face hub is unreachable and it is not in the cache"
    response = getattr(error, "response", None)
    if isinstance(error, errors.HfHubHTTPError) and response is not None:
        return f"HTTP {response.status_code} from the hub"
    detail = str(error).strip().splitlines()
    return f"{type(error).__name__}: {detail[0][:120]}" if detail else type(error).__name__
