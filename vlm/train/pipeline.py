"""Run a recipe's pipeline (vlm/train/recipes.py): every phase in order, or one of them.

    vlmstack train llava --recipe llava-easyvqa --out runs/llava                 # every phase
    vlmstack train llava --recipe llava-easyvqa --out runs/llava --resume        # after a stop
    vlmstack train llava --recipe llava-easyvqa --out runs/llava --phase anneal  # one phase

Layout of OUT: `pipeline.json` (the resolved pipeline and its sha256, written when the run
begins), `phases/NAME/` for each phase but the last, and the last phase's run in OUT
itself, which so ends up the model directory (a one-phase recipe trains in OUT, as a
single run always did). A phase continues the model of the phase of its kind before it;
a phase is finished when its directory holds a model card.

Resuming skips finished phases and continues an interrupted one from its checkpoint.
A run whose recipe changed since it began is refused, naming the first phase that differs:
its finished phases were trained by the old settings.
"""

import json
import logging
import subprocess
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

from vlm import hub
from vlm.atomic import write_json
from vlm.errors import VlmError
from vlm.train import checkpoint, distributed
from vlm.train.recipes import PHASE_REFERENCE, Phase, Pipeline, load_pipeline

log = logging.getLogger(__name__)
RECORD_FILE = "pipeline.json"


def train_pipeline(
    kind: str,
    spec: str,
    out: str | Path,
    *,
    resume: bool = False,
    phase: str | None = None,
    overrides: dict | None = None,
) -> dict:
    """Run every phase of recipe `spec` (or only `phase`) into `out`; returns the
    validation metrics of the last phase run (or, all finished, of the model in `out`).

    Args:
        overrides: merged into every phase (see load_pipeline), e.g. a trial run's max_steps.

    Raises:
        VlmError: a bad recipe; `out` holds a run (without resume or phase) or a run of a
            changed recipe; `phase` is unknown or the phase it continues is not finished.
    """
    pipeline = load_pipeline(spec, kind, overrides=overrides)
    out = Path(out)
    chosen = [pipeline.phase(phase)] if phase else pipeline.phases
    _begin(pipeline, out, resume=resume, phase=phase)
    metrics = {}
    for current in chosen:
        run_dir = phase_dir(pipeline, out, current)
        if resume and _finished(run_dir):
            log.info("phase %s already finished in %s", current.name, run_dir)
            metrics = json.loads((run_dir / hub.CARD_FILE).read_text()).get("validation", {})
            continue
        metrics = _run_phase(pipeline, out, current, resume=resume and checkpoint.has_checkpoint(run_dir))
        if current is pipeline.phases[-1] and distributed.is_main():
            _write_pipeline_card(pipeline, out)
    return metrics


def phase_dir(pipeline: Pipeline, out: Path, phase: Phase) -> Path:
    """Where a phase trains: OUT/phases/NAME, the last phase in OUT itself."""
    return out if phase is pipeline.phases[-1] else out / "phases" / phase.name


def _finished(run_dir: Path) -> bool:
    return (run_dir / hub.CARD_FILE).is_file()


def _begin(pipeline: Pipeline, out: Path, *, resume: bool, phase: str | None) -> None:
    """Record the pipeline in a new run; check an existing run's is the same."""
    path = out / RECORD_FILE
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    distributed.barrier()  # every rank has looked before rank 0 writes
    if record is not None:
        _check_unchanged(record, pipeline, path)
        if not resume and phase is None:
            raise VlmError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    elif distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, {"sha256": pipeline.sha256(), "pipeline": pipeline.resolved()})


def _check_unchanged(record: dict, pipeline: Pipeline, path: Path) -> None:
    if record.get("sha256") == pipeline.sha256():
        return
    before = record.get("pipeline", {}).get("phases", [])
    for old, new in zip_longest(before, pipeline.resolved()["phases"]):
        if old != new:
            name = (new or old).get("name")
            what = "added" if old is None else "removed" if new is None else f"changed ({_difference(old, new)})"
            raise VlmError(
                f"{path.parent}: the recipe changed since this run began: phase {name!r} {what}; "
                f"finish the run with the recipe in {path} or choose another --out"
            )
    raise VlmError(f"{path.parent}: the recipe changed since this run began; choose another --out")


def _difference(old, new, prefix: str = "") -> str:
    """The first setting that differs, as "train.lr 0.001 -> 0.0005"."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} {json.dumps(old)} -> {json.dumps(new)}"


def _run_phase(pipeline: Pipeline, out: Path, phase: Phase, *, resume: bool) -> dict:
    from vlm.train.clip import train_clip
    from vlm.train.flamingo import train_flamingo
    from vlm.train.llava import train_llava
    from vlm.train.lm import train_lm

    trainers = {"clip": train_clip, "lm": train_lm, "llava": train_llava, "flamingo": train_flamingo}
    index = pipeline.phases.index(phase)
    previous = [p for p in pipeline.phases[:index] if p.kind == phase.kind]
    start = _finished_dir(pipeline, out, previous[-1], phase) if previous else None
    recipe = phase.recipe
    lm = getattr(recipe, "lm", None) if phase.kind != "lm" else None
    if lm and lm.startswith(PHASE_REFERENCE):
        lm_phase = pipeline.phase(lm[len(PHASE_REFERENCE) :])
        recipe = replace(recipe, lm=str(_finished_dir(pipeline, out, lm_phase, phase)))
    run_dir = phase_dir(pipeline, out, phase)
    log.info("phase %s (%s) -> %s", phase.name, phase.kind, run_dir)
    metrics = trainers[phase.kind](recipe, run_dir, resume=resume, start=start)
    if distributed.is_main():
        hub.update_card(run_dir, phase=phase.name, recipe=phase.recipe_json)
    distributed.barrier()  # the next phase, on every rank, starts from this one's saved model
    return metrics


def _finished_dir(pipeline: Pipeline, out: Path, needed: Phase, phase: Phase) -> Path:
    directory = phase_dir(pipeline, out, needed)
    if not _finished(directory):
        raise VlmError(
            f"phase {phase.name!r} starts from phase {needed.name!r}'s model, which {directory} does not hold yet; run --phase {needed.name} first"
        )
    return directory


def _write_pipeline_card(pipeline: Pipeline, out: Path) -> None:
    """The final model's card: the resolved pipeline, the commit and the one command that
    builds it, and each phase's training time."""
    seconds = {
        p.name: json.loads((phase_dir(pipeline, out, p) / hub.CARD_FILE).read_text()).get("train_seconds")
        for p in pipeline.phases
        if _finished(phase_dir(pipeline, out, p))
    }
    seconds["total"] = round(sum(s for s in seconds.values() if s), 1)
    hub.update_card(
        out,
        recipe=pipeline.recipe_json,
        pipeline=pipeline.resolved(),
        pipeline_sha256=pipeline.sha256(),
        commit=git_commit(),
        command=f"vlmstack train {pipeline.kind} --recipe {pipeline.source} --out {out}",
        pipeline_train_seconds=seconds,
    )


def git_commit() -> str:
    """The short commit of the vlmstack source tree, or "unknown" outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"
