"""Results into the text a person reads: the `cli` prints what these return, nothing more."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tuner.console import counted
from tuner.records import COUNTED, RECORDS, Outcome

if TYPE_CHECKING:
    import torch

    from tuner.bench.ensembles import EnsembleBenchConfig, SeedRow
    from tuner.bench.epochs import Packed, Row
    from tuner.bench.overhead import OverheadConfig, OverheadRow, Reference
    from tuner.ensemble import EnsembleReport
    from tuner.stores import Stores
    from tuner.study.page import Written
    from tuner.study.session import RefitSummary
    from tuner.study.setup import Created
    from tuner.study.status import Status
    from tuner.study.summary import RunSummary


def created(name: str, result: Created, stores: Stores, typed: str | None = None) -> str:
    """`typed`: how the study was named on the command line (a path to its file, perhaps):
    the next command names it the same way."""
    verb = "created" if result.created else "already exists:"
    runs = result.runs
    return "\n".join(
        [
            f"study {name!r} {verb}",
            stores.describe(),
            f"  MLflow experiment {runs.experiment_id}, parent run {runs.parent_run_id}",
            f"next: tuner study run {typed or name}",
        ]
    )


def report_written(written: Written) -> str:
    return "\n".join(
        [
            f"wrote {written.html} (self-contained: open it in a browser, attach it to a PR)",
            f"  and {written.markdown} (its pictures beside it)",
            f"logged to the parent run {written.logged_to} under report/",
        ]
    )


_ORDER = [*COUNTED, Outcome.KILLED]


def run_summary(name: str, summary: RunSummary, hints: bool = True) -> str:
    which: dict[Outcome, list[str]] = {}  # which trials diverged or failed, and why
    for f in summary.failures:
        why = "" if f.outcome is Outcome.DIVERGED else f": {f.reason.splitlines()[0][:120]}"
        which.setdefault(f.outcome, []).append(f"trial {f.number}{why}")
    ran = ", ".join(
        f"{n} {RECORDS[o].word}" + (f" ({'; '.join(which[o])})" if o in which else "")
        for o, n in sorted(summary.ran.items(), key=lambda item: _ORDER.index(item[0]))
    )
    lines = [f"\nran {ran or 'no trials'} in {summary.seconds:.1f} s"]
    lines += [
        f"  trial {lost} was retried as trial {retry}"
        for lost, retry in sorted(summary.retried.items())
    ]
    if summary.workers:
        lines.append("workers: " + "; ".join(summary.workers))
    if not hints:  # a refit's: its best is not the study's
        return "\n".join(lines)
    if summary.best is not None:
        lines.append(f"best so far: trial {summary.best.number}, val_acc {summary.best.value:.4f}")
    see = [f"tuner study status {name}", f"tuner report {name}", f"tuner ui {name}"]
    if summary.completed >= 2:
        see.append(f"tuner ensemble {name} --top {min(5, summary.completed)}")
    lines.append("see: " + "  |  ".join(see))
    return "\n".join(lines)


def status(name: str, result: Status, where: str) -> str:
    from tuner.space import decode

    lines = [
        f"study {name!r}  ({where})",
        "  ".join(f"{RECORDS[o].word}: {n}" for o, n in result.counts.items()),
        f"model {result.builder or result.family} on {result.data}",
    ]
    if result.best is None:
        return "\n".join([*lines, "no completed trials yet"])
    lines.append(f"\nbest: trial {result.best.number}, val_acc {result.best.value:.4f}")
    lines += [
        f"  {key:<13} {_rounded(value)}"
        for key, value in decode(result.best.params, result.family, result.builder)
        .as_dict()
        .items()
    ]
    lines.append(f"\ntop {len(result.top)}:")
    points = [decode(trial.params, result.family, result.builder) for trial in result.top]
    wide = max(len("network"), *(len(p.network()) for p in points))
    lines.append(
        f"{'trial':>6}  {'val_acc':>8}  {'network':<{wide}}  {'optimizer':<9} "
        f"{'lr':>9} {'wd':>8}  the rest"
    )
    for trial, p in zip(result.top, points, strict=True):
        rest = p.details().split(" ", 2)[2]  # after lr= and wd=: the family's, and augment
        lines.append(
            f"{trial.number:>6}  {trial.value:>8.4f}  {p.network():<{wide}}  "
            f"{p.optimizer:<9} {p.lr:>9.2e} {p.weight_decay:>8.1e}  {rest}"
        )
    return "\n".join(lines + _refits_and_ensembles(name, result))


def _refits_and_ensembles(name: str, result: Status) -> list[str]:
    """What `tuner refit` and `tuner ensemble` made of the study, or the command to make it."""
    lines = ["\nrefits (on train + validation):"]
    lines += [
        f"  of trial {r.of}: {r.epochs} epochs, train_loss {r.train_loss:.4f}"
        for r in result.refits
    ] or [f"  none yet: tuner refit {name}"]
    lines.append("ensembles scored (on the test images):")
    latest = {e["name"]: e for e in result.ensembles}  # one line each: the last scored
    lines += [
        f"  {e['name']}: trial{'s' if len(e['members']) != 1 else ''} "
        f"{', '.join(str(n) for n in e['members'])}; test_acc {e['test_acc']:.4f}, "
        f"{_points(e['gain_points'] / 100)} over the best single"
        for e in latest.values()
    ] or [f"  none yet: tuner ensemble {name} --top 5"]
    return lines


def _rounded(value: object) -> str:
    """A float to 3 significant digits (`0.0235`, `3.84e-05`); anything else as it is."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def status_json(name: str, result: Status, where: str) -> str:
    """`study status --json`: the same as `status`, for scripts (values unrounded)."""
    import dataclasses
    import json
    import math

    from tuner.space import decode

    def number(value: float) -> float | str:
        # JSON has no infinity (Python writes `Infinity`, which strict parsers refuse and jq
        # reads as 1.797e+308): ±inf, a value Optuna keeps, is the string "inf" or "-inf"
        return value if math.isfinite(value) else str(value)

    def trial(t: Any) -> dict[str, Any]:
        return {"number": t.number, "val_acc": number(t.value),
                "params": decode(t.params, result.family, result.builder).as_dict()}  # fmt: skip

    def refit(r: Any) -> dict[str, Any]:
        return {**dataclasses.asdict(r), "train_loss": number(r.train_loss)}

    return json.dumps(
        {
            "study": name,
            "storage": where,
            "model": result.builder or result.family,
            "data": result.data,
            "counts": {RECORDS[o].word: n for o, n in result.counts.items()},
            "best": trial(result.best) if result.best is not None else None,
            "top": [trial(t) for t in result.top],
            "parent_run_id": result.parent_run_id,
            "refits": [refit(r) for r in result.refits],
            "ensembles": list(result.ensembles),
        },
        indent=2,
    )


def ensemble(result: EnsembleReport) -> str:
    from tuner.ensemble import member_table

    fewer = _fewer_members(result)
    lines = [
        _ensemble_head(result),
        *([fewer] if fewer else []),
        member_table(result),
        "",
        f"{'':<28}{'val_acc':>8}  {'val_loss':>8}  {'test_acc':>8}  {'test_loss':>9}",
    ]

    def row(label: str, val: Any, test: Any) -> str:
        v = f"{'–':>8}  {'–':>8}"
        if val is not None:
            v = f"{val.accuracy:>8.4f}  {val.log_loss:>8.4f}"
        return f"{label:<28}{v}  {test.accuracy:>8.4f}  {test.log_loss:>9.4f}"

    single = result.single
    lines.append(row("ensemble", result.val, result.test))
    if result.test_tta is not None:
        lines.append(row("ensemble + flip", result.val_tta, result.test_tta))
    lines.append(row(f"best single (trial {single.trial_number})", result.single_val,
                     result.single_test))  # fmt: skip
    if result.single_test_tta is not None:
        lines.append(row("best single + flip", None, result.single_test_tta))
    gain = _points(result.gain)
    if result.test_tta is not None and result.single_test_tta is not None:
        flip = result.test_tta.accuracy - result.single_test_tta.accuracy
        gain += f" ({flip * 100:+.2f} with flip on both)"
    refit = " (the search trials' predictions: the refits trained on them)"
    refit *= result.request.source == "refit"
    lines += [
        f"gain over the best single trial: {gain}, on {result.test_images} test images",
        f"validation figures are in-sample: members and weights were chosen on these "
        f"{result.val_images} images, which flatters the ensemble{refit}; the test figures are "
        "the fair comparison",
        f"logged as MLflow run {result.run_id}",
    ]
    return "\n".join(lines)


def _points(fraction: float) -> str:
    """An accuracy difference as people read it, in percentage points: `+1.20 points`."""
    return f"{fraction * 100:+.2f} points"


def _ensemble_head(result: EnsembleReport) -> str:
    """What it chose from, and what the weights optimise."""
    r = result.request
    pool = counted(result.candidates, "refit" if r.source == "refit" else "completed trial")
    chosen = (
        "weights chosen to lower the validation log-loss, by bagged greedy selection"
        if r.method == "greedy"
        else "the top by validation accuracy, equal weights"
    )
    temps = ", a temperature fitted per member" if r.temperature else ""
    return f"\n{r.method} ensemble of {len(result.members)} from {pool} ({chosen}{temps}):"


def _fewer_members(result: EnsembleReport) -> str | None:
    """Why the ensemble has fewer members than `--top` asked, or None."""
    r, have, members = result.request, result.candidates, len(result.members)
    if members >= r.k:
        return None
    name = result.study or "NAME"
    skipped = f", {result.left_out} more without usable validation predictions"
    skipped *= result.left_out > 0
    why = []
    if have < r.k and r.source == "refit":
        exist = "exists" if have == 1 else "exist"
        why.append(f"{counted(have, 'refit')} {exist}{skipped} "
                   f"(`tuner refit {name} --top {r.k}` makes more)")  # fmt: skip
    elif have < r.k:
        why.append(f"the study has {counted(have, 'completed trial')} with saved validation "
                   f"predictions{skipped} (`tuner study run {name}` runs more)")  # fmt: skip
    if members == 1 < min(have, r.k):  # greedy's own choice: `average` takes all it may
        why.append("greedy kept 1: no mixture with another network lowered the validation "
                   "log-loss")  # fmt: skip
    elif members < min(have, r.k):
        why.append(f"greedy kept {members}: once these were in (a network picked twice "
                   "weighs twice), no further pick, new or repeated, lowered the validation "
                   "log-loss")  # fmt: skip
    return f"fewer than the {r.k} asked: " + "; ".join(why)


def ensemble_bench(rows: list[SeedRow], cfg: EnsembleBenchConfig) -> str:
    """One line per seed, then the mean and spread of each column; greedy against average."""
    from tuner.bench.ensembles import mean_and_spread
    from tuner.devices import describe

    columns = [
        ("single", "best single"),
        ("single_flip", "+flip"),
        ("average", f"top-{cfg.top} avg"),
        ("average_flip", "+flip"),
        ("greedy", "greedy"),
        ("greedy_flip", "+flip"),
    ]
    head = f"{'seed':>6}  {'trials':>6}  " + "  ".join(f"{t:>11}" for _, t in columns)
    lines = [
        f"\nensemble selection: {len(rows)} studies of {cfg.trials} trials of {cfg.study!r} "
        f"({cfg.epochs} epochs, width {cfg.width}, batch {cfg.batch_size}) on "
        f"{describe(cfg.device)}",
        f"test accuracy on {rows[0].test_images} test images; members and weights chosen on "
        f"{cfg.val_size} validation images",
        "",
        head + f"  {'study s':>8}  greedy members:weights",
    ]
    for r in rows:
        cells = "  ".join(f"{getattr(r, key):>11.4f}" for key, _ in columns)
        lines.append(f"{r.seed:>6}  {r.completed:>6}  {cells}  {r.study_seconds:>8.0f}  "
                     f"{r.greedy_weights}")  # fmt: skip
    stats = {key: mean_and_spread([getattr(r, key) for r in rows]) for key, _ in columns}
    lines.append(
        f"{'mean':>6}  {'':>6}  " + "  ".join(f"{stats[k][0]:>11.4f}" for k, _ in columns)
    )
    lines.append(
        f"{'± sd':>6}  {'':>6}  " + "  ".join(f"{stats[k][1]:>11.4f}" for k, _ in columns)
    )
    for plain in ("greedy", "greedy_flip"):
        other = plain.replace("greedy", "average")
        diffs = [getattr(r, plain) - getattr(r, other) for r in rows]
        wins = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)
        mean, spread = mean_and_spread(diffs)
        flip = " with flip" if plain.endswith("flip") else ""
        lines.append(f"greedy − average{flip}: {mean * 100:+.2f} ± {spread * 100:.2f} points "
                     f"(wins/ties/losses {wins[0]}/{wins[1]}/{wins[2]})")  # fmt: skip
    gain, spread = mean_and_spread([r.greedy - r.single for r in rows])
    lines.append(f"greedy − best single: {gain * 100:+.2f} ± {spread * 100:.2f} points")
    losses = [mean_and_spread([getattr(r, f"{k}_loss") for r in rows])
              for k in ("single", "average", "greedy")]  # fmt: skip
    lines.append("test log-loss (mean ± sd): " + ", ".join(
        f"{name} {m:.4f} ± {s:.4f}" for name, (m, s) in
        zip(("best single", f"top-{cfg.top} avg", "greedy"), losses, strict=True)))  # fmt: skip
    return "\n".join(lines)


def refit_summary(name: str, summary: RefitSummary, top: int) -> str:
    """What `tuner refit` ran, and every refit the study has now."""
    ran = summary.run
    lines = [run_summary(name, ran, hints=False).rstrip()] if ran.ran else ["\nno refit to run"]
    if summary.refits:
        lines.append(f"refits of {name!r} (trained on train + validation):")
        lines += [
            f"  trial {source:>4}: {refit.epochs} epochs, MLflow run {refit.run_id}"
            for source, refit in sorted(summary.refits.items())
        ]
        k = min(top, len(summary.refits))
        lines.append(f"see: tuner ensemble {name} --from refit --top {k}")
    return "\n".join(lines)


def bench(
    rows: list[Row],
    packed: list[Packed],
    device: torch.device,
    source: str,
    images: int,
    width: float,
) -> str:
    from tuner.devices import describe

    return "\n".join(
        [
            f"\n{describe(device)}; {images:,} images per epoch from {source}; width {width}",
            bench_table(rows, packed),
            "epoch s: median of the timed epochs (tuner's includes validating 256 images); "
            "× ref: the reference's epoch time over this path's; warm-up s: first epoch minus a "
            "timed one (compiling, caches); pays after: epochs a compiled path needs before "
            "the seconds it saves per epoch repay its warm-up beyond eager's (once per "
            "architecture and worker)",
        ]
    )


def bench_table(rows: list[Row], packed: list[Packed]) -> str:
    lines = [
        f"{'model':<12} {'path':<26} {'epoch s':>8} {'images/s':>10} {'× ref':>6} "
        f"{'warm-up s':>9} {'pays after':>10} {'peak GiB':>8}"
    ]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        warmup = "" if r.warmup_seconds is None else f"{r.warmup_seconds:.1f}"
        peak = "" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        lines.append(
            f"{r.depth:<12} {r.path:<26} {r.epoch_seconds:>8.3f} "
            f"{r.images_per_second:>10,.0f} {ratio:>6} {warmup:>9} {_payback(r):>10} {peak:>8}"
        )
    if packed:
        lines += ["", f"{'packed workers':<15} {'images/s (all)':>15} {'× one worker':>13}"]
        lines += [
            f"{p.workers:<15} {p.images_per_second:>15,.0f} {p.ratio:>13.2f}" for p in packed
        ]
    return "\n".join(lines)


def _payback(row: Row) -> str:
    if row.pays_after is None:
        return ""
    return "never" if math.isinf(row.pays_after) else f"{row.pays_after:.0f} ep"


OVERHEAD_TARGETS = (
    "targets: wall time ≤ 5% over the epochs at N = 100, ≤ 8% at N = 1,000; status ≤ 1.0 s"
)


def overhead(rows: list[OverheadRow], reference: Reference, cfg: OverheadConfig) -> str:
    from tuner.bench.overhead import GPU_EPOCH_SECONDS

    lines = [
        f"\ntuner's bookkeeping (SQLite stores; per size, a `study run` of {cfg.trials} trials "
        f"of 15 epochs replayed every {cfg.epoch_seconds:g} s; VGG16-BN weights, 59 MB, saved "
        "per trial)",
        f"{'N':>6} {'epochs s':>8} {'wall s':>7} {'over':>6} {'start s':>7} {'end s':>6} "
        f"{'trial ms':>8} {'/trial':>6} {'epoch ms':>8} {'ask ms':>7} {'status s':>8} "
        f"{'fill s':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r.size:>6,} {r.epochs_s:>8.1f} {r.wall_s:>7.1f} {100 * r.over:>5.1f}% "
            f"{r.start_s:>7.2f} {r.end_s:>6.2f} {r.trial_ms:>8.0f} {100 * r.trial_share:>5.1f}% "
            f"{r.epoch_ms:>8.1f} {r.ask_ms:>7.1f} {r.status_s:>8.2f} {r.fill_s:>6.0f}"
        )
    lines += [
        f"reference: the bare training loop, {reference.what}: {reference.epoch_ms:.0f} ms per "
        f"epoch; a GPU epoch on tuner's path: {GPU_EPOCH_SECONDS * 1000:.0f} ms",
        "epochs s: the replayed epochs' time, summed; wall s: the whole `study run`; over: "
        "wall time above the epochs'; start s: until its first trial trains; end s: after its "
        "last trial is recorded (the study's pictures); trial ms: median time per trial "
        "outside its epochs (the draw, the model, the MLflow run, the weights, tell: each "
        "trial's overhead_seconds), and /trial against a trial's epochs; epoch ms: mean time "
        "in tuner's per-epoch callback (hand-over to the writer; the pruner at its epochs); "
        "ask ms: `ask` + `suggest`; status s: `tuner study status` as a new process (median "
        "of 3, after a first)",
        OVERHEAD_TARGETS,
    ]
    return "\n".join(lines)
