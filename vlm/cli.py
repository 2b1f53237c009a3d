"""The `vlmstack` command. Thin: parse arguments, call the library, print results.

User errors (bad names, missing or unwritable files, unreadable data) print one line and exit 2;
`--debug` shows the traceback instead.
"""

import argparse
import json
import logging
import os
import sys

from vlm.errors import VlmError

EXIT_USAGE = 2
MAX_NEW_TOKENS = 4096  # a generous bound; the model's own context is checked when it loads


def whole(low: int, high: int | None = None):
    """An argparse type: a whole number in [low, high], refused in one line otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a number {bounds}")
        return value

    parse.__name__ = "whole number"
    return parse


def memory_size(text: str) -> int:
    """An argparse type: bytes, written as 12G, 512M, 64K or a plain number of bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number, unit = (text[:-1], units[text[-1].upper()]) if text[-1:].upper() in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        value = 0
    if not value >= 1 or value > 2**50:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 12G, 512M or 64K")
    return int(value)


def score(text: str) -> float:
    """An argparse type: a cosine similarity, -1 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is out of range: scores are cosine similarities from -1 to 1")
    return value


def _train(args) -> None:
    from vlm.train import distributed
    from vlm.train.pipeline import train_pipeline

    distributed.init_from_env()  # under torchrun: join the process group
    metrics = train_pipeline(args.kind, args.recipe, args.out, resume=args.resume, phase=args.phase)
    if distributed.is_main():
        print(json.dumps({"out": args.out, "validation": metrics}))


def _eval(args) -> None:
    if args.kind == "clip":
        from vlm.clip import load_clip
        from vlm.data.sources import caption_records
        from vlm.eval.clip import evaluate_clip

        records = caption_records(args.data)[: args.limit]
        metrics = evaluate_clip(load_clip(args.model, precision=_precision(args)), records, batch_size=args.batch_size)
    else:
        from vlm.data.sources import vqa_records
        from vlm.eval.vqa import evaluate_vqa
        from vlm.load import load_vlm

        if args.shots and args.shot_data.startswith("easyvqa:test"):
            raise VlmError("--shot-data must not be the test split: few-shot examples come from training data")
        records = vqa_records(args.data)[: args.limit]
        shots = vqa_records(args.shot_data) if args.shots else None
        model = load_vlm(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype, quantize=args.quantize)
        metrics = evaluate_vqa(model, records, batch_size=args.batch_size, shots=args.shots, shot_pool=shots)
    print(json.dumps(metrics))


def _index(args) -> None:
    from retrieval import build_index, shards, update_index
    from vlm.quantize import clip_precision

    if args.action == "build" and shards.is_embeddings(args.folder):
        if args.model or args.engine != "local":
            raise VlmError(f"{args.folder} is already embedded (with its own model): drop --model and --engine")
        report = shards.build_index_from_shards(args.folder, args.out, spec=args.index_spec, max_memory=args.max_memory)
    elif args.action == "build":
        with clip_precision(_local_precision(args)):  # retrieval loads the CLIP by name
            report = build_index(
                args.folder,
                args.out,
                model=args.model or "clip-easyvqa",
                spec=args.index_spec,
                max_memory=args.max_memory,
                backend=args.backend,
                milvus_uri=args.milvus_uri or "",
                batch_size=args.batch_size,
                workers=args.workers,
                engine=args.engine,
                ray_address=args.ray_address,
            )
    else:
        report = update_index(args.index, batch_size=args.batch_size, workers=args.workers)
    print(report.summary())


def _search(args) -> None:
    from retrieval import Searcher

    if not args.query and not args.image:
        raise VlmError("give a text query, --image PATH, or both")
    searcher = Searcher.open(args.index, model=args.model)
    if args.image:
        hits = searcher.search_image(args.image, k=args.k, min_score=args.min_score, text=args.query)
    else:
        hits = searcher.search_text(args.query, k=args.k, min_score=args.min_score)
    for hit in hits:
        if args.json:
            print(json.dumps({"rank": hit.rank, "score": round(hit.score, 6), "path": hit.path}))
        else:
            print(f"{hit.rank:>3}  {hit.score:.4f}  {hit.path}")


def _embed(args) -> None:
    from retrieval.shards import embed_to_shards
    from vlm.quantize import clip_precision

    with clip_precision(_local_precision(args)):  # retrieval loads the CLIP by name
        report = embed_to_shards(
            args.source,
            args.out,
            model=args.model,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            workers=args.workers,
            engine=args.engine,
            ray_address=args.ray_address,
        )
    print(report.summary())


def _caption(args) -> None:
    from apps.caption import caption_folder
    from vlm import download
    from vlm.data.conversations import DEFAULT_CAPTION_PROMPT
    from vlm.load import load_vlm

    model = args.model
    if download.is_hub_spec(model):  # once here, not in every Ray actor
        model = str(download.download(model))
    if args.engine == "local":
        model = load_vlm(model, trust_remote_code=args.trust_remote_code, dtype=args.dtype, quantize=args.quantize)
    elif args.trust_remote_code or args.dtype != "float32" or args.quantize:
        raise VlmError("--trust-remote-code, --dtype and --quantize work with --engine local only")
    report = caption_folder(
        args.folder,
        model=model,
        out=args.out,
        fmt=args.format,
        prompt=args.prompt or DEFAULT_CAPTION_PROMPT,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        recursive=args.recursive,
        overwrite=args.overwrite,
        engine=args.engine,
        workers=args.workers,
        ray_address=args.ray_address,
    )
    print(report.summary())


def _app(args) -> None:
    from apps.gradio_app import launch

    if args.allow_remote:
        logging.getLogger("vlmstack").warning(
            "serving on %s: anyone who can reach this address can use the app", args.host
        )
    launch(
        index=args.index,
        models=args.model,
        host=args.host,
        port=args.port,
        allow_remote=args.allow_remote,
        trust_remote_code=args.trust_remote_code,
        precision=_precision(args),
        api=args.api,
        api_key=args.api_key or os.environ.get("VLMSTACK_API_KEY") or None,
    )


def _serve(args) -> None:
    from apps.server import serve

    serve(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("VLMSTACK_API_KEY") or None,
        models=args.model,
        clip_model=args.clip_model,
        index=args.index,
        allow_remote_images=args.allow_remote_images,
        max_batch=args.max_batch,
        trust_remote_code=args.trust_remote_code,
        precision=_precision(args),
    )


def _finetune(args) -> None:
    from vlm.finetune import FinetuneOptions, default_train_config, finetune

    train = default_train_config()
    for name in ("epochs", "batch_size", "lr"):
        if getattr(args, name) is not None:
            setattr(train, name, getattr(args, name))
    options = FinetuneOptions(
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        targets=args.lora_targets,
        train_projector=args.train_projector,
        train_tokens=args.train_tokens,
        quantize_base=args.quantize_base,
        train=train,
    )
    card = finetune(
        args.model, args.data, args.out, options=options, resume=args.resume, trust_remote_code=args.trust_remote_code
    )
    print(
        f"{args.out}: adapter for {card['base']}, {card['adapter_parameters']:,} parameters "
        f"({100 * card['adapter_share']:.2f}% of {card['base_parameters']:,}), trained in {card['train_seconds']} s"
    )
    print(json.dumps(card["validation"]))


def _merge(args) -> None:
    from vlm.adapters import merge_adapter

    merge_adapter(args.adapter, args.out, base=args.base)
    print(f"{args.out}: {args.adapter} merged into its base")


def _export(args) -> None:
    from vlm.hf_llava import export_model

    print(export_model(args.model, args.out))


def _import(args) -> None:
    from vlm.openflamingo_import import PROMPT_FORMAT, import_openflamingo

    out = import_openflamingo(
        checkpoint=args.checkpoint,
        vision=args.vision,
        lm=args.lm,
        cross_attn_every=args.cross_attn_every,
        out=args.out,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"{out} (prompt it as OpenFlamingo was: {PROMPT_FORMAT})")


def _ship(args) -> None:
    from vlm.ship import ship

    print(ship(args.directory, args.name))


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        default="local",
        choices=["local", "ray"],
        help="ray: run on Ray Data actors (pip install 'vlmstack[ray]')",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join, e.g. auto or ray://host:10001 (default: start a local Ray)",
    )


def _model_loading_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a model whose LM runs Python code saved with it (imported OpenFlamingo-3B's MPT); "
        "that code runs with your permissions",
    )
    _precision_arguments(parser)


def _precision_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype; bfloat16 halves the memory where the CPU computes it natively (else float32, warned)",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        choices=["int8"],
        help="int8: dynamic int8 linear layers (float32 elsewhere; falls back to float32 without int8 kernels)",
    )


def _precision(args):
    """--dtype and --quantize, checked now (the app and the server load models later)."""
    from vlm.load import DTYPES
    from vlm.quantize import Precision, check_quantize

    check_quantize(args.quantize, DTYPES[args.dtype])
    return Precision(dtype=args.dtype, quantize=args.quantize)


def _local_precision(args):
    """The precision of a CLIP that retrieval loads by name; Ray actors load their own in float32."""
    if args.engine != "local" and (args.dtype != "float32" or args.quantize):
        raise VlmError("--dtype and --quantize work with --engine local only")
    return _precision(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmstack", description="CLIP image search, visual question answering and captioning."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model from a recipe")
    train.add_argument("kind", choices=["clip", "lm", "llava", "flamingo"], help="which model to train")
    train.add_argument("--recipe", required=True, help="recipe name (vlm/recipes/) or JSON file")
    train.add_argument("--out", required=True, help="run directory; becomes the model directory")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT: skip finished phases, resume the interrupted one",
    )
    train.add_argument("--phase", default=None, metavar="NAME", help="run only this phase of the recipe's pipeline")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a model; the last line printed is JSON")
    evaluate.add_argument("kind", choices=["clip", "vqa"], help="clip: retrieval metrics; vqa: answer accuracy")
    evaluate.add_argument(
        "--model",
        required=True,
        help="shipped name, model directory, open_clip:ARCH/TAG|ARCH@PATH (clip) or hf:ORG/NAME (vqa)",
    )
    evaluate.add_argument("--data", required=True, help="easyvqa:train, easyvqa:test, or a .jsonl/.csv file")
    evaluate.add_argument("--batch-size", type=whole(1), default=64)
    evaluate.add_argument("--limit", type=whole(1), default=None, help="score only the first N examples")
    evaluate.add_argument(
        "--shots", type=whole(0, 16), default=0, help="vqa: K solved examples before each question (few-shot)"
    )
    evaluate.add_argument(
        "--shot-data", default="easyvqa:train", help="vqa: where few-shot examples come from (never the test data)"
    )
    _model_loading_arguments(evaluate)
    evaluate.set_defaults(run=_eval)

    index = commands.add_parser("index", help="build or update an image index of a folder")
    actions = index.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="index every image under a folder")
    build.add_argument(
        "folder", help="folder of images (searched recursively), or an embeddings folder from `vlmstack embed`"
    )
    build.add_argument("--out", required=True, help="index directory to create")
    build.add_argument(
        "--model", default=None, help="CLIP model (default: clip-easyvqa; an embeddings folder keeps its own)"
    )
    build.add_argument("--index-spec", default="auto", help="FAISS index_factory string, or auto (by size)")
    build.add_argument(
        "--max-memory",
        type=memory_size,
        default=0,
        help="RAM the index may take, e.g. 8G: decides auto's Flat / SQ8 / PQ codes (default: half this machine's)",
    )
    build.add_argument(
        "--backend",
        default="faiss",
        choices=["faiss", "milvus"],
        help="where vectors are searched: faiss (in the index directory) or milvus (a collection at --milvus-uri); "
        "update, search, the app and the server follow the index",
    )
    build.add_argument(
        "--milvus-uri", default=None, help="Milvus server (http://HOST:19530) or Milvus Lite file (./photos.db)"
    )
    update = actions.add_parser("update", help="embed new and changed files, drop deleted ones")
    update.add_argument("index", help="index directory")
    for sub in (build, update):
        sub.add_argument("--batch-size", type=whole(1), default=256)
        sub.add_argument(
            "--workers", type=whole(0), default=2, help="image decoding processes (Ray actors with --engine ray)"
        )
    _engine_arguments(build)
    _precision_arguments(build)
    index.set_defaults(run=_index)

    embed = commands.add_parser(
        "embed", help="embed a big folder or webdataset into resumable shards (then `index build` them)"
    )
    embed.add_argument(
        "source", help="folder of images, or webdataset shards (a .tar, a folder of them, or {00000..00099}.tar)"
    )
    embed.add_argument("--out", required=True, help="embeddings folder: NNNNN.npy + NNNNN.jsonl per shard")
    embed.add_argument("--model", default="clip-easyvqa", help="CLIP model (default: clip-easyvqa)")
    embed.add_argument(
        "--shard-size", type=whole(1), default=10_000, help="images per shard; a crash loses at most one"
    )
    embed.add_argument("--batch-size", type=whole(1), default=256)
    embed.add_argument(
        "--workers", type=whole(0), default=2, help="image decoding processes (Ray actors with --engine ray)"
    )
    _engine_arguments(embed)
    _precision_arguments(embed)
    embed.set_defaults(run=_embed)

    search = commands.add_parser("search", help="search an index by text and/or example image")
    search.add_argument("index", help="index directory")
    search.add_argument("query", nargs="?", default=None, help='text; "a + b - c" and "2:a" weight terms')
    search.add_argument("-k", type=whole(1, 10_000), default=10, help="results to return (default 10)")
    search.add_argument("--image", help="find images similar to this one")
    search.add_argument("--min-score", type=score, default=None, help="drop results below this cosine similarity")
    search.add_argument("--model", default=None, help="must match the index's model (default: the index's)")
    search.add_argument("--json", action="store_true", help='one {"rank", "score", "path"} object per line')
    search.set_defaults(run=_search)

    caption = commands.add_parser("caption", help="caption every image in a folder (resumable)")
    caption.add_argument("folder", help="folder of images, or webdataset shards")
    caption.add_argument(
        "--model",
        default="llava-easyvqa",
        help="VQA model: llava-easyvqa, flamingo-easyvqa, a directory or hf:ORG/NAME (downloaded)",
    )
    caption.add_argument("--out", help="output file (.jsonl or .csv); not needed for --format txt")
    caption.add_argument(
        "--format", default=None, choices=["jsonl", "csv", "txt"], help="default: from --out's extension, else jsonl"
    )
    caption.add_argument(
        "--prompt",
        default=None,
        help="instruction given with each image (default: the caption instruction the models learnt)",
    )
    caption.add_argument("--batch-size", type=whole(1), default=16)
    caption.add_argument("--max-new-tokens", type=whole(1, MAX_NEW_TOKENS), default=32)
    caption.add_argument("--recursive", action="store_true", help="include images in subfolders")
    caption.add_argument(
        "--overwrite", action="store_true", help="start over instead of skipping images already captioned"
    )
    caption.add_argument("--workers", type=whole(1), default=2, help="Ray actors (with --engine ray)")
    _engine_arguments(caption)
    _model_loading_arguments(caption)
    caption.set_defaults(run=_caption)

    app = commands.add_parser("app", help="the web app: search, visual chat, captioning")
    app.add_argument("--index", default=None, help="index to search (default: the easy-VQA test images, built once)")
    app.add_argument(
        "--model",
        action="append",
        default=[],
        help="a LLaVA/Flamingo model directory or hf:ORG/NAME to offer beside the shipped ones (repeatable)",
    )
    app.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    app.add_argument(
        "--allow-remote", action="store_true", help="allow a --host other machines can reach (the page then says so)"
    )
    app.add_argument("--port", type=whole(1, 65535), default=7860)
    app.add_argument(
        "--api", action="store_true", help="also serve the OpenAI-compatible API (as vlmstack serve) at /openai/v1"
    )
    app.add_argument("--api-key", default=None, help="key the --api routes require (default: $VLMSTACK_API_KEY)")
    _model_loading_arguments(app)
    app.set_defaults(run=_app)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP API: chat with images, embeddings, search")
    serve.add_argument(
        "--model",
        action="append",
        default=[],
        help="a LLaVA/Flamingo model directory or hf:ORG/NAME to offer beside the shipped ones (repeatable)",
    )
    serve.add_argument("--clip-model", default=None, help="CLIP for /v1/embeddings and search (default: the index's)")
    serve.add_argument("--index", default=None, help="index for /v1/search (default: none, search is off)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=whole(1, 65535), default=8000)
    serve.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY on /v1 routes (or set VLMSTACK_API_KEY); needed for a non-loopback --host",
    )
    serve.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public addresses only)"
    )
    serve.add_argument("--max-batch", type=whole(1, 256), default=16, help="chat requests generated together")
    _model_loading_arguments(serve)
    serve.set_defaults(run=_serve)

    tune = commands.add_parser("finetune", help="LoRA-fine-tune a VQA model on your images; writes a small adapter")
    tune.add_argument("model", help="base: shipped name, LLaVA/Flamingo directory, HF LLaVA directory or hf:ORG/NAME")
    tune.add_argument(
        "--data",
        required=True,
        help="captions .jsonl/.csv, LLaVA conversations .json, VQA .jsonl/.csv, a folder of images with .txt "
        "captions beside them, or easyvqa:train",
    )
    tune.add_argument("--out", required=True, help="adapter directory (run directory while training)")
    tune.add_argument("--lora-rank", type=whole(1, 1024), default=8, help="LoRA rank (default 8)")
    tune.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    tune.add_argument(
        "--lora-targets",
        nargs="+",
        default=None,
        help="LM Linear layer names (default: its decoder's self-attention ones, e.g. q_proj k_proj v_proj o_proj)",
    )
    tune.add_argument(
        "--train-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train the embedding rows of the tokens the answers use (default on)",
    )
    tune.add_argument(
        "--train-projector",
        action="store_true",
        help="also train the projector (LLaVA) or resampler and cross-attention (Flamingo) in full",
    )
    tune.add_argument(
        "--quantize-base", default=None, choices=["int8"], help="hold the frozen LM in int8 (QLoRA-style)"
    )
    tune.add_argument("--epochs", type=whole(1), default=None, help="passes over the data (default 2)")
    tune.add_argument("--batch-size", type=whole(1), default=None, help="default 16")
    tune.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3)")
    tune.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    tune.add_argument(
        "--trust-remote-code", action="store_true", help="allow a base whose LM runs Python code saved with it"
    )
    tune.set_defaults(run=_finetune)

    merge = commands.add_parser("merge", help="fold a LoRA adapter into its base: a standalone model directory")
    merge.add_argument("adapter", help="adapter directory from `vlmstack finetune`")
    merge.add_argument("--out", required=True, help="model directory to write")
    merge.add_argument("--base", default=None, help="where its base is now, if moved (must have the same weights)")
    merge.set_defaults(run=_merge)

    export = commands.add_parser("export", help="write a LLaVA model as a Hugging Face checkpoint (transformers, vLLM)")
    export.add_argument("model", help="shipped name or LLaVA model directory")
    export.add_argument("--format", required=True, choices=["hf-llava"], help="hf-llava: LlavaForConditionalGeneration")
    export.add_argument("--out", required=True, help="new directory to write")
    export.set_defaults(run=_export)

    imports = commands.add_parser("import", help="write a model trained elsewhere as a vlmstack model directory")
    sources = imports.add_subparsers(dest="action", required=True, metavar="SOURCE")
    flamingo = sources.add_parser("openflamingo", help="an OpenFlamingo checkpoint.pt with its CLIP and LM")
    flamingo.add_argument("--checkpoint", required=True, help="OpenFlamingo's checkpoint.pt (read as tensors only)")
    flamingo.add_argument("--vision", required=True, help="its CLIP, e.g. open_clip:ViT-L-14@/path/to/weights")
    flamingo.add_argument("--lm", required=True, help="its language model: Hugging Face directory or hub id")
    flamingo.add_argument("--cross-attn-every", type=whole(1), required=True, help="its cross_attn_every_n_layers")
    flamingo.add_argument("--out", required=True, help="model directory to write")
    flamingo.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the LM run Python code it ships (MPT); that code runs with your permissions",
    )
    imports.set_defaults(run=_import)

    ship = commands.add_parser(
        "ship", help="developers: put a trained model inside the package as a shipped name (fp16)"
    )
    ship.add_argument("directory", help="trained model directory")
    ship.add_argument("--name", required=True, help="shipped name, e.g. llava-easyvqa")
    ship.set_defaults(run=_ship)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "caption" and args.format is None:
        args.format = "csv" if (args.out or "").endswith(".csv") else "jsonl"
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        args.run(args)
    except (VlmError, OSError, ValueError) as e:  # OSError: a missing, unwritable or busy file
        if args.debug:
            raise
        print(f"vlmstack: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vlmstack: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
