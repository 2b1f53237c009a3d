"""Run a recipe's pipeline (vlm/train/recipes.py): every phase in order, or one of them.

    vlmstack train llava --recipe llava-easyvqa --out runs/llava                 # every phase
    vlmstack train llava --recipe llava-easyvqa --out runs/llava --resume        # after a stop
    vlmstack train llava --recipe llava-easyvqa --out runs/llava --phase anneal  # one phase

Layout of OUT: `pipeline.json` (the run's record: the recipe as written, its LM recipes,
the commit; written when the run begins), `recipe.json` (the recipe as written, to finish
the run with), `phases/NAME/` for each phase but the last, and the last phase's run in OUT
itself, which so ends up the model directory (a one-phase recipe trains in OUT, as a
single run always did). A phase continues the model of the phase of its kind before it;
a phase is finished when its directory holds a model card. A record counts as a run once
some phase directory holds a checkpoint or a card; until then a new start rewrites it.

Resuming skips finished phases and continues an interrupted one from its checkpoint.
A run whose recipe changed since it began is refused, naming the first phase that differs:
its finished phases were trained by the old settings. Both recipes are resolved by
today's vlmstack, so a default a newer vlmstack adds changes neither.
"""

import json
import logging
import shlex
import subprocess
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

from vlm import hub
from vlm.atomic import write_json
from vlm.errors import VlmError
from vlm.train import checkpoint, distributed
from vlm.train.recipes import PHASE_REFERENCE, Phase, Pipeline, build_pipeline, load_pipeline

log = logging.getLogger(__name__)
RECORD_FILE = "pipeline.json"
RECIPE_FILE = "recipe.json"  # the recipe as written: `--recipe OUT/recipe.json` finishes the run
LEGACY_STAGE1 = "stage1"  # where a version 2 `train llava` (before pipelines) ran stage 1


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
        VlmError: a bad recipe; `out` holds a run (without resume or phase), a run of a
            changed recipe, a run from before pipelines or a damaged record; `phase` is
            unknown or a phase it needs is not finished.
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
            metrics = _card(run_dir).get("validation", {})
            continue
        metrics = _run_phase(pipeline, out, current, resume=resume and checkpoint.has_checkpoint(run_dir))
    # Also completes a card a stop left without the pipeline's fields (written after training).
    if distributed.is_main() and _finished(out) and "pipeline" not in _card(out):
        _write_pipeline_card(pipeline, out)
    return metrics


def phase_dir(pipeline: Pipeline, out: Path, phase: Phase) -> Path:
    """Where a phase trains: OUT/phases/NAME, the last phase in OUT itself."""
    return out if phase is pipeline.phases[-1] else out / "phases" / phase.name


def _finished(run_dir: Path) -> bool:
    return (run_dir / hub.CARD_FILE).is_file()


def _card(run_dir: Path) -> dict:
    return json.loads((run_dir / hub.CARD_FILE).read_text(encoding="utf-8"))


def _trained_anything(out: Path) -> bool:
    """Whether some phase directory of OUT (or a pre-pipeline run's) holds a checkpoint or a card."""
    phases = out / "phases"
    dirs = [out, out / LEGACY_STAGE1, *(phases.iterdir() if phases.is_dir() else [])]
    return any(checkpoint.has_checkpoint(d) or _finished(d) for d in dirs)


def _begin(pipeline: Pipeline, out: Path, *, resume: bool, phase: str | None) -> None:
    """Check OUT can take this run; record the pipeline in a new one. Nothing is written
    before every check passed."""
    path = out / RECORD_FILE
    trained = _trained_anything(out)
    record = _read_record(path) if trained else None  # a record of a run that trained nothing is rewritten
    distributed.barrier()  # every rank has looked before rank 0 writes
    if trained and record is None:
        raise VlmError(
            f"{out} holds a run that predates pipelines (no {RECORD_FILE}); it cannot be resumed as one: choose another --out"
        )
    if record is not None:
        _check_unchanged(record, pipeline, out)
        if not resume and phase is None:
            raise VlmError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if phase is not None:
        for needed in _needs(pipeline, pipeline.phase(phase)):
            _finished_dir(pipeline, out, needed, pipeline.phase(phase))
    if record is None and distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RECIPE_FILE, pipeline.recipe_json)
        write_json(
            path,
            {
                "kind": pipeline.kind,
                "source": pipeline.source,
                "recipe": pipeline.recipe_json,
                "lm_recipes": pipeline.lm_recipes(),
                "overrides": pipeline.overrides,
                "commit": git_commit(),
                "sha256": pipeline.sha256(),
                "pipeline": pipeline.resolved(),
            },
        )


def _read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmError(f"{path} is damaged (not valid JSON: {e}); choose another --out") from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("recipe", record.get("pipeline")), dict)
        or not all(isinstance(record.get(key, {}), dict) for key in ("lm_recipes", "overrides"))
    ):
        raise VlmError(f"{path} is damaged (not the record of a run: no recipe); choose another --out")
    return record


def _check_unchanged(record: dict, pipeline: Pipeline, out: Path) -> None:
    """Refuse `pipeline` unless it resolves, today, to the pipeline of the recipe the run
    began with (recorded as written, and resolved again now)."""
    path = out / RECORD_FILE
    if "recipe" in record:
        try:
            before = build_pipeline(
                record["recipe"],
                record.get("kind", pipeline.kind),
                source=str(record.get("source")),
                where=f"{path} [recipe]",
                overrides=record.get("overrides"),
                lm_recipes=record.get("lm_recipes"),
            ).resolved()
        except VlmError as e:
            raise VlmError(
                f"{out}: the recipe this run began with no longer loads ({e}); choose another --out"
            ) from None
    else:  # recorded by the first pipelines, which kept only the resolved pipeline
        before = record["pipeline"]
    after = pipeline.resolved()
    if before == after:
        return
    hint = f"finish the run with --recipe {out / RECIPE_FILE} or choose another --out"
    for old, new in zip_longest(before.get("phases", []), after["phases"]):
        if old != new:
            name = (new or old).get("name")
            what = "added" if old is None else "removed" if new is None else f"changed ({_difference(old, new)})"
            raise VlmError(f"{out}: the recipe changed since this run began: phase {name!r} {what}; {hint}")
    raise VlmError(f"{out}: the recipe changed since this run began ({_difference(before, after)}); {hint}")


def _difference(old, new, prefix: str = "") -> str:
    """The first setting that differs: "train.lr 0.001 -> 0.0005", "train.max_steps added (2)"."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old:
                return f"{prefix}{key} added ({json.dumps(new[key])})"
            if key not in new:
                return f"{prefix}{key} removed (was {json.dumps(old[key])})"
            if old[key] != new[key]:
                return _difference(old[key], new[key], f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} {json.dumps(old)} -> {json.dumps(new)}"


def _needs(pipeline: Pipeline, phase: Phase) -> list[Phase]:
    """The phases whose models `phase` starts from: the phase of its kind before it, and
    the LM phase its "lm" names."""
    index = pipeline.phases.index(phase)
    needs = [p for p in pipeline.phases[:index] if p.kind == phase.kind][-1:]
    lm = getattr(phase.recipe, "lm", None) if phase.kind != "lm" else None
    if lm and lm.startswith(PHASE_REFERENCE):
        needs.append(pipeline.phase(lm[len(PHASE_REFERENCE) :]))
    return needs


def _run_phase(pipeline: Pipeline, out: Path, phase: Phase, *, resume: bool) -> dict:
    from vlm.train.clip import train_clip
    from vlm.train.flamingo import train_flamingo
    from vlm.train.llava import train_llava
    from vlm.train.lm import train_lm

    trainers = {"clip": train_clip, "lm": train_lm, "llava": train_llava, "flamingo": train_flamingo}
    start, recipe = None, phase.recipe
    for needed in _needs(pipeline, phase):
        if needed.kind == phase.kind:
            start = _finished_dir(pipeline, out, needed, phase)
        else:  # the LM phase "lm": "phase:NAME" names
            recipe = replace(recipe, lm=str(_finished_dir(pipeline, out, needed, phase)))
    run_dir = phase_dir(pipeline, out, phase)
    log.info("phase %s (%s) -> %s", phase.name, phase.kind, run_dir)
    card = {"phase": phase.name, "recipe": phase.recipe_json, "commit": git_commit()}
    metrics = trainers[phase.kind](recipe, run_dir, resume=resume, start=start, card=card)
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
    """The final model's card: the resolved pipeline, the one command that builds it, each
    phase's training time, and the commits that trained it if they differ."""
    cards = {
        p.name: _card(phase_dir(pipeline, out, p)) for p in pipeline.phases if _finished(phase_dir(pipeline, out, p))
    }
    seconds = {name: card.get("train_seconds") for name, card in cards.items()}
    seconds["total"] = round(sum(s for s in seconds.values() if s), 1)
    record = _read_record(out / RECORD_FILE) or {}
    commits = [record.get("commit"), *(card.get("commit") for card in cards.values())]
    distinct = list(dict.fromkeys(c for c in commits if c))
    hub.update_card(
        out,
        recipe=pipeline.recipe_json,
        pipeline=pipeline.resolved(),
        pipeline_sha256=pipeline.sha256(),
        command=shlex.join(["vlmstack", "train", pipeline.kind, "--recipe", pipeline.source, "--out", str(out)]),
        pipeline_train_seconds=seconds,
        **({"commits": distinct} if len(distinct) > 1 else {}),
    )


def git_commit() -> str:
    """The short commit of the vlmstack source tree, "-dirty" when tracked files have
    changes not committed, or "unknown" outside git."""
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--exclude=*"],  # --exclude: a hash, never a tag
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"
