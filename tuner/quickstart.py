"""`tuner quickstart`: the main job, sized for the machine it runs on. With a GPU, `vgg-cifar`;
on a CPU, where `vgg-cifar` would take days (measured, not guessed), `vgg-cifar-smoke`, its
twin on quarter-width networks and 2,000 images. Then, for either: the study, refits of its
best trials, their greedy ensemble with flip TTA against the best single one, the report.
Each step is the command of the same name; run again, each continues where it stopped."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner import report
from tuner.console import duration
from tuner.ensemble import EnsembleRequest, evaluate
from tuner.errors import TunerError
from tuner.stores import Stores
from tuner.study.cost import measure
from tuner.study.named import load
from tuner.study.page import make_report
from tuner.study.session import RunRequest, run_refit, run_study

log = logging.getLogger(__name__)

GPU_STUDY = "vgg-cifar"
CPU_STUDY = "vgg-cifar-smoke"
CPU_HOURS = 4.0  # what a newcomer on a CPU waits at most: the GPU study past it is not run


@dataclass(frozen=True)
class Choice:
    study: str
    why: str


def choose(device: torch.device, stores: Stores) -> Choice:
    """The study this machine runs in reasonable time, and why, in words."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return Choice(GPU_STUDY, f"{device} is a GPU ({name}): the study it is sized for")
    spec = load(GPU_STUDY, stores)
    cost = measure(spec, device, spec.trials, limit=CPU_HOURS * 3600)
    if cost.seconds <= CPU_HOURS * 3600:
        return Choice(GPU_STUDY, f"no GPU, but it fits this CPU ({cost.says()})")
    return Choice(
        CPU_STUDY,
        f"no GPU here, and {GPU_STUDY} would take {'at least' if cost.partial else 'about'} "
        f"{duration(cost.seconds)} on this CPU (measured): its twin sized for a CPU instead "
        f"(`tuner study run {GPU_STUDY} --device cuda` on a GPU machine)",
    )


def quickstart(stores: Stores, device: torch.device, data_dir: Path | None) -> Path:
    """Choose, then create, run, refit, ensemble and report; the report's HTML file."""
    began = time.perf_counter()
    if not Path("studies", f"{CPU_STUDY}.yaml").is_file():
        raise TunerError(
            f"quickstart runs the study files in studies/ ({GPU_STUDY}.yaml, {CPU_STUDY}.yaml): "
            "run it from the folder of tuner's repository, which holds them"
        )
    choice = choose(device, stores)
    log.info(f"quickstart: {choice.study} — {choice.why}")
    spec = load(choice.study, stores)
    request = RunRequest(devices=(device,), data_dir=data_dir, max_hours=CPU_HOURS)
    summary = run_study(spec, stores, request)
    log.info(report.run_summary(spec.name, summary, hints=False))
    if summary.completed < 1:
        raise TunerError(f"no trial of {spec.name!r} completed: nothing to refit (reasons above)")
    top, epochs = spec.refit.top, spec.refit.epochs or spec.train.epochs
    refits = run_refit(spec, stores, RunRequest(devices=(device,), data_dir=data_dir), top, epochs)
    log.info(report.refit_summary(spec.name, refits, top))
    ensemble = EnsembleRequest(k=top, source="refit", tta="flip")
    log.info(report.ensemble(evaluate(spec, stores, ensemble, data_dir=data_dir, device=device)))
    written = make_report(spec, stores, Path("reports"))
    log.info(report.report_written(written))
    log.info(
        f"\nquickstart done in {duration(time.perf_counter() - began)}: {spec.name} on {device}"
        f"\nsee: tuner ui {spec.name}  |  {written.html}  |  tuner study status {spec.name}"
    )
    return written.html
