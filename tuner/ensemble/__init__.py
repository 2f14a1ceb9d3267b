"""Ensembles of a study's trials: which to take and how to weigh them (`selection`, numpy
only), and scoring them on the test split (`evaluate`)."""

from tuner.ensemble.evaluate import (
    Candidate,
    EnsembleReport,
    EnsembleRequest,
    Member,
    Scores,
    evaluate,
    evaluate_top,
    load_member,
    load_weights,
    member_table,
)

__all__ = [
    "Candidate",
    "EnsembleReport",
    "EnsembleRequest",
    "Member",
    "Scores",
    "evaluate",
    "evaluate_top",
    "load_member",
    "load_weights",
    "member_table",
]
