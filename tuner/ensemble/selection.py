"""Which trials an ensemble takes, and with what weights, from their validation predictions
alone: numpy in, numbers out (no model, no store).

`greedy` is Caruana et al.'s ensemble selection (ICML 2004): start from the best single model,
then add, with replacement, the model that lowers the mixture's validation log-loss most; a
model picked twice weighs twice. Bagged, as the same paper advises against overfitting a small
validation set: the selection is made on random halves of the candidates, and their weights
averaged. (On the benchmark's 1,000 validation images, one selection put 0.44 and 0.44 on two
networks, and lost 1.2 points of test accuracy to the equal top-5; bagged, 0.1.) A half without
the best model starts from a worse one, and the average of the halves can then do worse on the
validation images than the best model alone (28 of 400 simulated pools of 4 to 15 models): then
every half gets the best model too, so that greedy never does. `average` is the K best by
validation accuracy, equally weighted. A temperature per member (Guo et al., 2017) is fitted on
the validation images before either, when asked: an over-confident member then no longer
outvotes the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EPS = 1e-12  # floor of a probability before its log: a float32 softmax rounds to 0
ROUNDS_PER_MEMBER = 5  # greedy picks up to this many times K models (with replacement)
BAGS = 20  # selections on random subsets of the candidates, whose weights are averaged
BAG_FRACTION = 0.5  # of the candidates in each
BAG_FROM = 4  # fewer candidates than this: one selection over all of them
TEMPERATURES = (0.05, 20.0)  # the range searched for a member's temperature
GOLDEN_STEPS = 40  # of the golden-section search: the bracket shrinks to 1e-8 of its width


@dataclass(frozen=True)
class Selection:
    """An ensemble's members (indices into the candidates) and their weights, which sum to 1."""

    method: str  # greedy | average
    members: tuple[int, ...]  # heaviest first; a tie: the earlier candidate
    weights: tuple[float, ...]
    val_log_loss: float  # of the weighted mixture on the validation images it was chosen on

    def weight_of(self) -> dict[int, float]:
        return dict(zip(self.members, self.weights, strict=True))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Counted, then divided: 0.39, not float32's 0.38999998."""
    return int((probs.argmax(1) == labels).sum()) / len(labels)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (probabilities floored at EPS)."""
    return float(_nll(probs[np.arange(len(labels)), labels].astype(np.float64)))


def _nll(truth: np.ndarray) -> np.ndarray:
    """The mean negative log of the true class's probabilities (the last axis: images)."""
    return -np.log(np.maximum(truth, EPS)).mean(axis=-1)


def mixture(probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of the members' class probabilities."""
    total = np.zeros(probs[0].shape, dtype=np.float64)
    for p, w in zip(probs, weights, strict=True):
        total += w * p
    return total


def average(
    val_accs: Sequence[float], k: int, probs: Sequence[np.ndarray], labels: np.ndarray
) -> Selection:
    """The `k` best candidates by validation accuracy (a tie: the earlier), equally weighted."""
    order = sorted(range(len(val_accs)), key=lambda i: (-val_accs[i], i))[:k]
    weights = [1 / len(order)] * len(order)
    loss = log_loss(mixture([probs[i] for i in order], weights), labels)
    return Selection("average", tuple(order), tuple(weights), loss)


def greedy(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    k: int,
    rounds: int | None = None,
    bags: int = BAGS,
    seed: int = 0,
) -> Selection:
    """Bagged forward selection with replacement of at most `k` distinct members on the
    mixture's validation log-loss: `bags` selections, each on a seeded random half of the
    candidates (one on all of them when there are few, or `k` is 1), their weights averaged,
    the `k` heaviest kept. Its validation log-loss is never worse than the best candidate's
    alone (see `_plans`)."""
    if not probs:
        raise ValueError("greedy selection needs at least one candidate")
    # only the true class's probability enters the log-loss: candidates × images
    truth = np.stack([p[np.arange(len(labels)), labels] for p in probs]).astype(np.float64)
    rounds = rounds if rounds is not None else ROUNDS_PER_MEMBER * k
    alone = _nll(truth)
    for subsets in _plans(len(probs), k, bags, seed, int(np.argmin(alone))):
        chosen = _bagged(truth, subsets, k, rounds)
        if chosen.val_log_loss <= float(alone.min()) + 1e-12:  # the last plan always is
            break
    return chosen


def _plans(n: int, k: int, bags: int, seed: int, best: int) -> list[list[np.ndarray]]:
    """The candidates of each selection, for each way greedy tries in turn: random halves;
    the same halves, each with the `best` candidate (each selection then starts from it and
    only keeps what improves on it, and the log-loss of a mixture is convex in its weights:
    their average is no worse either, unless keeping the `k` heaviest undoes it); one
    selection over all of them, which starts from the best and so cannot end worse."""
    everything = [np.arange(n)]
    if n < BAG_FROM or k == 1 or bags <= 1:
        return [everything]
    rng = np.random.default_rng(seed)
    size = max(2, round(n * BAG_FRACTION))
    halves = [np.sort(rng.choice(n, size, replace=False)) for _ in range(bags)]
    return [halves, [np.union1d(h, [best]) for h in halves], everything]


def _bagged(truth: np.ndarray, subsets: list[np.ndarray], k: int, rounds: int) -> Selection:
    """One forward selection per subset of the candidates, their weights averaged, the `k`
    heaviest kept and weighed again to sum to 1."""
    total = np.zeros(len(truth))
    for subset in subsets:
        counts = _forward(truth[subset], k, rounds)
        picked = sum(counts.values())
        for i, c in counts.items():
            total[subset[i]] += c / picked
    order = sorted((int(i) for i in np.flatnonzero(total)), key=lambda i: (-total[i], i))[:k]
    weights = total[order] / total[order].sum()
    loss = float(_nll(weights @ truth[order]))
    return Selection("greedy", tuple(order), tuple(float(w) for w in weights), loss)


def _forward(truth: np.ndarray, k: int, rounds: int) -> dict[int, int]:
    """One forward selection with replacement (Caruana's): how often each candidate was
    picked in the best bag seen along the way (the smallest, when several score the same)."""
    losses = _nll(truth)
    first = int(np.argmin(losses))
    counts, total = {first: 1}, truth[first].copy()
    best_loss, best_counts = float(losses[first]), dict(counts)
    for picks in range(1, rounds):
        allowed = np.arange(len(truth)) if len(counts) < k else np.array(sorted(counts))
        mixed = (total[None, :] + truth[allowed]) / (picks + 1)
        scores = _nll(mixed)
        choice = int(allowed[int(np.argmin(scores))])
        counts[choice] = counts.get(choice, 0) + 1
        total += truth[choice]
        if float(scores.min()) < best_loss - 1e-12:
            best_loss, best_counts = float(scores.min()), dict(counts)
    return best_counts


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities with their logits divided by `temperature` (> 1 softens them)."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.maximum(probs.astype(np.float64), EPS)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the validation log-loss (golden-section search on its
    logarithm, within TEMPERATURES); 1.0 when no temperature does better than none."""
    low, high = (math.log(t) for t in TEMPERATURES)
    ratio = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return log_loss(tempered(probs, math.exp(log_t)), labels)

    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(GOLDEN_STEPS):
        if fa < fb:
            high, b, fb = b, a, fa
            a = low + (1 - ratio) * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    best = (a + b) / 2
    return math.exp(best) if loss(best) < log_loss(probs, labels) else 1.0
