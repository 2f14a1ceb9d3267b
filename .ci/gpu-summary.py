"""The figures of a study run by `.ci/gpu study`, from its own stores (the default ones under
./mlruns) and nvidia-smi's samples: trials by state, the best validation accuracy, epoch time
per architecture, compile warm-up, per-trial overhead outside the epochs, GPU utilisation.

    python .ci/gpu-summary.py NAME SMI_CSV WALL_SECONDS
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import mlflow
import optuna


def quantiles(values: list[float]) -> str:
    if not values:
        return "none"
    values = sorted(values)
    return (
        f"median {statistics.median(values):.3f}, p90 {values[int(0.9 * (len(values) - 1))]:.3f},"
        f" max {values[-1]:.3f} (n={len(values)})"
    )


def trials(name: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage="sqlite:///mlruns/optuna.db")
    states = Counter(t.state.name.lower() for t in study.trials)
    print("trials:", ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    best = study.best_trial
    print(f"best validation accuracy: {best.value:.4f} (trial {best.number}, {best.params})")


def runs(name: str) -> None:
    mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
    client = mlflow.MlflowClient()
    found = mlflow.search_runs(experiment_names=[name], output_format="list")
    found = [r for r in found if r.data.tags.get("tuner.role") == "trial"]
    epochs: dict[str, list[float]] = defaultdict(list)
    first, overhead = [], []
    for run in found:
        arch = run.data.params.get("depth", "?") + (
            "-bn" if run.data.params.get("batch_norm") == "True" else ""
        )
        history = client.get_metric_history(run.info.run_id, "epoch_seconds")
        epochs[arch] += [m.value for m in history if m.step > 1]  # epoch 1 holds the warm-up
        warmup = client.get_metric_history(run.info.run_id, "first_step_seconds")
        first += [m.value for m in warmup]
        if "overhead_seconds" in run.data.metrics:
            overhead.append(run.data.metrics["overhead_seconds"])
    print("epoch seconds after the first, per architecture:")
    for arch, values in sorted(epochs.items()):
        print(f"  {arch:<9} {quantiles(values)}")
    print(f"first step (compile or capture, once per architecture and worker): {quantiles(first)}")
    print(f"per-trial overhead outside the epochs: {quantiles(overhead)}")


def gpu(samples: Path) -> None:
    rows = [r for r in csv.reader(samples.open()) if len(r) >= 3]
    busy = [float(r[1]) for r in rows if r[1].strip().replace(".", "").isdigit()]
    memory = [float(r[2]) for r in rows if r[2].strip().replace(".", "").isdigit()]
    if not busy:
        print("GPU utilisation: no samples")
        return
    print(
        f"GPU utilisation ({len(busy)} samples, every 0.5 s): mean {statistics.mean(busy):.0f}%,"
        f" median {statistics.median(busy):.0f}%; memory used max {max(memory) / 1024:.1f} GiB"
    )


if __name__ == "__main__":
    study_name, smi, wall = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    print(f"\n== {study_name}: {wall:.0f} s wall")
    trials(study_name)
    runs(study_name)
    gpu(smi)
