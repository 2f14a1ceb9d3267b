"""Every MLflow call of tuner: the runs (`runs`), the patient client (`client`), atomic and
checksummed artifacts (`artifacts`), and what made each run (`provenance`)."""

from tuner.tracking.artifacts import ARCHITECTURE, VAL_PREDICTIONS, WEIGHTS, sha256
from tuner.tracking.client import build_tracking_schema, check_reachable, check_tracking
from tuner.tracking.runs import (
    StoresDisagree,
    StudyRuns,
    Tracker,
    TrialOutputs,
    TrialRunRef,
)

__all__ = [
    "ARCHITECTURE",
    "VAL_PREDICTIONS",
    "WEIGHTS",
    "StoresDisagree",
    "StudyRuns",
    "Tracker",
    "TrialOutputs",
    "TrialRunRef",
    "build_tracking_schema",
    "check_reachable",
    "check_tracking",
    "sha256",
]
