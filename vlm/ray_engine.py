"""Batch inference on Ray Data (`--engine ray`): image embedding and captioning.

Ray Data spreads the inputs over a pool of actors; each actor loads the model once and
then decodes and runs its batches. A file that cannot be read becomes a row with an
error, never a failed task. Results come back in input order and match the local
engine's. Ray is an optional extra: `pip install 'vlmstack[ray]'`.

    ray start --head                                  # or an existing cluster
    vlmstack caption photos/ --out c.jsonl --engine ray --ray-address auto --workers 8

Inputs travel as file references (path, or tar shard + byte range), not bytes: every
node must see the same files (shared storage), as with any Ray cluster reading files.
"""

import logging
from typing import Iterator, Sequence

import numpy as np

from vlm.data.webdataset import TarMember
from vlm.errors import VlmError
from vlm.images import ImageSource

log = logging.getLogger(__name__)


def init_ray(address: str | None = None):
    """Connect to the cluster at `address`, or start a local Ray on this machine's CPUs."""
    try:
        import ray
    except ImportError:
        raise VlmError("--engine ray needs Ray: pip install 'vlmstack[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    return ray


def _reference(index: int, source: ImageSource) -> dict:
    if isinstance(source, TarMember):
        return {"index": index, "path": source.shard, "name": source.name, "offset": source.offset, "size": source.size}
    return {"index": index, "path": str(source), "name": "", "offset": -1, "size": -1}


def _source(batch: dict, i: int) -> ImageSource:
    path, offset = str(batch["path"][i]), int(batch["offset"][i])
    return TarMember(path, str(batch["name"][i]), offset, int(batch["size"][i])) if offset >= 0 else path


def _run(
    actor, constructor: dict, sources: Sequence[ImageSource], *, batch_size: int, workers: int, address, progress: bool
) -> Iterator[dict]:
    """Rows {"index", ...outputs} from `actor` over `sources`, in input order."""
    ray = init_ray(address)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = progress
    dataset = ray.data.from_items([_reference(i, s) for i, s in enumerate(sources)])
    results = dataset.map_batches(
        actor,
        fn_constructor_kwargs=constructor,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    yield from results.iter_rows()


class _EmbedActor:
    def __init__(self, model: str):
        from vlm.clip import load_clip

        self.clip = load_clip(model)

    def __call__(self, batch: dict) -> dict:
        import torch

        count = len(batch["index"])
        vectors = np.zeros((count, self.clip.embed_dim), np.float32)
        errors = [""] * count
        pixels, readable = [], []
        for i in range(count):
            try:
                pixels.append(self.clip.transform(_source(batch, i)))
                readable.append(i)
            except VlmError as e:
                errors[i] = str(e)
        if pixels:
            with torch.inference_mode():
                vectors[readable] = self.clip.image_features(torch.stack(pixels)).float().numpy()
        return {"index": batch["index"], "vector": vectors, "error": np.array(errors, dtype=object)}


def embed_stream(model: str, sources: Sequence[ImageSource], *, batch_size=256, workers=2, address=None, progress=True):
    """(input position, (D,) float32 vector or None, error or None) per source, in order,
    as the actors finish them; the model is given by name (each actor loads it)."""
    for row in _run(
        _EmbedActor,
        {"model": model},
        sources,
        batch_size=batch_size,
        workers=workers,
        address=address,
        progress=progress,
    ):
        yield int(row["index"]), (None if row["error"] else row["vector"]), (row["error"] or None)


def embed_images(model: str, sources: Sequence[ImageSource], *, batch_size=256, workers=2, address=None, progress=True):
    """`vlm.embedding.embed_images` on Ray: the same Embeddings."""
    import torch

    from vlm.embedding import Embeddings

    vectors, indices, failures = [], [], []
    for index, vector, error in embed_stream(
        model, sources, batch_size=batch_size, workers=workers, address=address, progress=progress
    ):
        if error:
            log.warning("skipped %s", error)
            failures.append((index, error))
        else:
            vectors.append(vector)
            indices.append(index)
    dim = len(vectors[0]) if vectors else 0
    return Embeddings(torch.from_numpy(np.stack(vectors)) if vectors else torch.empty(0, dim), indices, failures)


class _CaptionActor:
    def __init__(self, model: str, prompt: str, max_new_tokens: int):
        from vlm.load import load_vlm

        self.model, self.prompt, self.max_new_tokens = load_vlm(model), prompt, max_new_tokens

    def __call__(self, batch: dict) -> dict:
        from vlm.images import load_image

        count = len(batch["index"])
        captions, errors, pictures, readable = [""] * count, [""] * count, [], []
        for i in range(count):
            try:
                pictures.append(load_image(_source(batch, i)))
                readable.append(i)
            except VlmError as e:
                errors[i] = str(e)
        if pictures:
            answers = self.model.answer_batch(
                pictures, [self.prompt] * len(pictures), max_new_tokens=self.max_new_tokens
            )
            for i, answer in zip(readable, answers):
                captions[i] = answer
        return {
            "index": batch["index"],
            "caption": np.array(captions, dtype=object),
            "error": np.array(errors, dtype=object),
        }


def caption_images(
    model: str,
    sources: Sequence[ImageSource],
    *,
    prompt: str,
    max_new_tokens: int,
    batch_size=16,
    workers=2,
    address=None,
    progress=True,
) -> Iterator[tuple[int, str | None, str | None]]:
    """(input position, caption or None, error or None) for each source, in order, as
    the actors finish them."""
    constructor = {"model": model, "prompt": prompt, "max_new_tokens": max_new_tokens}
    for row in _run(
        _CaptionActor, constructor, sources, batch_size=batch_size, workers=workers, address=address, progress=progress
    ):
        yield int(row["index"]), (None if row["error"] else row["caption"]), (row["error"] or None)
