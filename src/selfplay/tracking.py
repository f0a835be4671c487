"""Where metrics go besides train_log.jsonl: TensorBoard (the default), Weights & Biases, both
or none (`--report_to`).

A training logs its averaged metrics every logging_steps updates to each tracker; a W&B run
also gets the training's recipe as its config. `selfplay run` adds one W&B run for the run as
a whole (the same W&B group as its trainings): each model's accuracy with its interval, and
report.md with its plots. W&B is imported only when asked for, and follows its own
environment (WANDB_MODE=offline writes the runs locally, for `wandb sync` later).
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse
from typing import Any

from selfplay.errors import SelfplayError

TRACKERS = ("tensorboard", "wandb", "none")


def parse_report_to(value: str) -> set[str]:
    """`tensorboard,wandb` -> {"tensorboard", "wandb"}; `none` -> set()."""
    names = {v.strip() for v in value.split(",") if v.strip()}
    bad = sorted(names - set(TRACKERS))
    if bad or not names or ("none" in names and len(names) > 1):
        raise SelfplayError(f"--report_to {value!r}: give tensorboard, wandb, both "
                            "(comma-separated) or none.")
    return names - {"none"}


def check_reporting(report_to: str) -> None:
    """Before any work: --report_to wandb needs the package, and (unless W&B runs offline) an
    API key, which W&B would otherwise ask for at the first logged metric, after the model
    load and the reference pass, and fail there without a terminal."""
    if "wandb" not in parse_report_to(report_to):
        return
    _wandb()
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or \
            os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        known = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        known = None
    if not known:
        raise SelfplayError(f"--report_to wandb: no W&B API key here (neither WANDB_API_KEY nor "
                            f"an entry for {host} in ~/.netrc); run `wandb login`, or set "
                            "WANDB_MODE=offline to keep the runs local for `wandb sync`.")


def _wandb():
    try:
        import wandb
    except ImportError:
        raise SelfplayError("--report_to wandb needs the wandb package: pip install "
                            "'selfplay[wandb]' (or pip install wandb).") from None
    return wandb


class Trackers:
    """The trackers of one training. `step` is where a resumed training starts again:
    TensorBoard drops what it had logged after it."""

    def __init__(self, report_to: str, tensorboard_dir: Path, name: str, config: dict[str, Any],
                 project: str, step: int = 0):
        names = parse_report_to(report_to)
        self.tb = self.wb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=step + 1 if step else None)
        if "wandb" in names:
            self.wb = _wandb().init(project=project, name=name, config=config,
                                    job_type="train", reinit="finish_previous")

    def log(self, record: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in record.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(record, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def report_run(run_dir: Path, project: str, models: list[tuple[str, dict[str, Any]]],
               recipe: dict[str, Any]) -> None:
    """One W&B run for a finished `selfplay run`: each model's accuracy (step = its row in the
    report) with its 95% interval, and report.md with its plots."""
    wandb = _wandb()
    run = wandb.init(project=project, name=f"{run_dir.name} report", config=recipe,
                     job_type="report", reinit="finish_previous")
    try:
        for i, (name, acc) in enumerate(models):
            run.log({f"eval/{k}": v for k, v in acc.items() if v is not None}, step=i)
        run.summary["models"] = json.dumps([name for name, _ in models])
        for f in [run_dir / "report.md", *sorted((run_dir / "plots").glob("*.png"))]:
            run.save(str(f), base_path=str(run_dir), policy="now")
    finally:
        run.finish()
