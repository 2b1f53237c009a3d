"""Loss and metric curves of a run: appended to CSV as training goes, drawn to PNG."""

import csv
from pathlib import Path

from vlm.atomic import atomic_path


class CsvLog:
    """A CSV file that rows are appended to; its columns are fixed by the first row."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def append(self, row: dict) -> None:
        new = not self.path.is_file()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (they are re-run when a run resumes from `step`)."""
        rows = [r for r in self.rows() if int(r["step"]) <= step]
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def plot_curves(train_log: CsvLog, eval_log: CsvLog, path: Path) -> None:
    """Training loss (and learning rate) over steps; each evaluation metric over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = train_log.rows(), eval_log.rows()
    if not train:
        return
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [int(r["step"]) for r in train]
    ax_loss.plot(steps, [float(r["loss"]) for r in train], label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_yscale("log")
    ax_loss.legend(loc="upper right")
    ax_lr = ax_loss.twinx()
    ax_lr.plot(steps, [float(r["lr"]) for r in train], color="gray", alpha=0.4)
    ax_lr.set_ylabel("learning rate", color="gray")
    for name in [k for k in (evals[0] if evals else {}) if k not in ("step", "epoch")]:
        ax_eval.plot([int(r["step"]) for r in evals], [float(r[name]) for r in evals], marker="o", label=name)
    ax_eval.set_xlabel("step")
    ax_eval.set_title("validation")
    if evals:
        ax_eval.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
