"""Ensemble selection on made-up validation predictions whose best answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from tuner.ensemble.selection import (
    accuracy,
    average,
    fit_temperature,
    greedy,
    log_loss,
    mixture,
    tempered,
)

N, CLASSES = 400, 10


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def confident(
    labels: np.ndarray, right: np.ndarray, strength: float = 4.0, wrong: float | None = None
) -> np.ndarray:
    """Sure of the true class where `right` (`strength`), of the next class elsewhere
    (`wrong`, as sure unless given)."""
    logits = np.zeros((len(labels), CLASSES))
    guess = np.where(right, labels, (labels + 1) % CLASSES)
    logits[np.arange(len(labels)), guess] = np.where(right, strength, wrong or strength)
    return softmax(logits)


@pytest.fixture
def labels() -> np.ndarray:
    return np.arange(N) % CLASSES


def test_greedy_combines_models_that_are_right_on_different_images(labels) -> None:
    """Two specialists, each sure and right on its own 60% of the images and unsure elsewhere,
    against a generalist right on 65% of them: the generalist is the best single model, the
    specialists together the best ensemble; greedy finds them, average by accuracy does not."""
    half = np.arange(N) < N // 2
    first = confident(labels, half | (np.arange(N) % 5 == 0), 5.0, wrong=1.0)
    second = confident(labels, ~half | (np.arange(N) % 5 == 1), 5.0, wrong=1.0)
    generalist = confident(labels, np.arange(N) % 20 < 13)  # 65%
    probs = [generalist, first, second]
    chosen = greedy(probs, labels, k=3)
    assert {0} | set(chosen.members) >= {1, 2} and set(chosen.members) >= {1, 2}
    weights = chosen.weight_of()
    assert weights[1] == pytest.approx(weights[2]) and weights.get(0, 0) < weights[1]
    ensemble = mixture([probs[i] for i in chosen.members], chosen.weights)
    assert accuracy(ensemble, labels) > accuracy(generalist, labels) + 0.2
    top = average([accuracy(p, labels) for p in probs], 2, probs, labels)
    assert top.members[0] == 0  # the generalist heads the accuracy ranking
    assert chosen.val_log_loss < top.val_log_loss


def test_greedy_weights_sum_to_one_and_keep_at_most_k_members(labels) -> None:
    rng = np.random.default_rng(0)
    signal = np.eye(CLASSES)[labels]
    probs = [softmax(rng.normal(size=(N, CLASSES)) * 2 + 3 * signal * rng.random())
             for _ in range(12)]  # fmt: skip
    for k in (1, 2, 5):
        chosen = greedy(probs, labels, k)
        assert 1 <= len(chosen.members) <= k
        assert sum(chosen.weights) == pytest.approx(1.0)
        assert list(chosen.weights) == sorted(chosen.weights, reverse=True)
        singles = [log_loss(p, labels) for p in probs]
        assert chosen.val_log_loss <= min(singles) + 1e-12  # never worse than the best alone
    assert greedy(probs, labels, 1).members == (int(np.argmin(singles)),)


def test_greedy_repeats_the_stronger_model_rather_than_add_a_useless_one(labels) -> None:
    """A model right on 90% and one right on 60% (a subset of the first's images) mix best
    unevenly; a model that is confidently wrong everywhere is never taken."""
    strong = confident(labels, np.arange(N) % 10 < 9, strength=2.0)
    weak = confident(labels, np.arange(N) % 10 < 6, strength=2.0)
    wrong = confident(labels, np.zeros(N, bool), strength=6.0)
    chosen = greedy([weak, wrong, strong], labels, k=3)
    weights = chosen.weight_of()
    assert 1 not in weights
    assert weights[2] > weights.get(0, 0)


def test_average_takes_the_top_k_by_accuracy_equally_weighted(labels) -> None:
    probs = [confident(labels, np.arange(N) % 10 < right) for right in (5, 8, 8, 3, 9)]
    accs = [accuracy(p, labels) for p in probs]
    chosen = average(accs, 3, probs, labels)
    assert chosen.members == (4, 1, 2)  # a tie goes to the earlier trial
    assert chosen.weights == pytest.approx((1 / 3,) * 3)
    assert average(accs, 9, probs, labels).members == (4, 1, 2, 0, 3)


def test_a_fitted_temperature_undoes_overconfidence(labels) -> None:
    """Labels drawn from softmax(z); a model that says softmax(3z) is over-confident by 3."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8_000, CLASSES)) * 1.5
    truth = softmax(logits)
    drawn = (truth.cumsum(1) > rng.random((len(truth), 1))).argmax(1)
    assert fit_temperature(softmax(3 * logits), drawn) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(truth, drawn) == pytest.approx(1.0, rel=0.1)
    softened = tempered(softmax(3 * logits), 3.0)
    assert np.allclose(softened, truth, atol=1e-3)  # probabilities under EPS differ
    assert np.allclose(softened.sum(1), 1.0)
    assert log_loss(softened, drawn) < log_loss(softmax(3 * logits), drawn)


def test_bagging_spreads_the_weight_that_one_selection_piles_on_few_models(labels) -> None:
    """On random halves of the candidates, the selections differ; averaged, no model carries
    the weight that one selection on all of them gives its favourites (which overfit a
    validation set of a thousand images). The same seed, the same ensemble."""
    rng = np.random.default_rng(3)
    signal = np.eye(CLASSES)[labels]
    strength = [3.5, 3.5] + [2.5] * 8  # two strong networks, eight fair ones
    probs = [softmax(rng.normal(size=(N, CLASSES)) * 2 + s * signal) for s in strength]
    one = greedy(probs, labels, k=5, bags=1)
    bagged = greedy(probs, labels, k=5)
    assert max(bagged.weights) < max(one.weights)
    assert len(bagged.members) >= len(one.members)
    assert greedy(probs, labels, k=5) == bagged
    assert greedy(probs, labels, k=5, seed=1) != bagged


@pytest.mark.parametrize("k", [2, 3, 4])
def test_greedy_is_never_worse_on_validation_than_the_best_model_alone(labels, k) -> None:
    """Three copies of a sure model that is wrong on 40% of the images, and one modest model
    right on 80%: random halves without the modest one pick the sure ones, and their average
    used to lose to the modest model alone (2.42 against 1.20 nats with k=2, the modest one
    left out). The ensemble keeps it, heaviest, and loses to no single member."""
    sure = confident(labels, np.arange(N) % 10 < 6, strength=6.0)
    modest = confident(labels, np.arange(N) % 10 < 8, strength=2.0)
    probs = [sure, modest, sure, sure]
    chosen = greedy(probs, labels, k)
    assert chosen.members[0] == 1
    assert chosen.val_log_loss <= log_loss(modest, labels) + 1e-12
    mixed = mixture([probs[i] for i in chosen.members], chosen.weights)
    assert log_loss(mixed, labels) == pytest.approx(chosen.val_log_loss)


def test_greedy_beats_or_ties_the_best_model_alone_on_random_pools(labels) -> None:
    """Pools of 4 to 12 models of mixed skill and confidence, sharing their mistakes: the
    promise holds on every one of them."""
    signal = np.eye(CLASSES)[labels]
    for seed in range(40):
        rng = np.random.default_rng(seed)
        shared = rng.normal(size=(N, CLASSES))
        probs = [softmax((rng.uniform(0.5, 2.5) * signal + 0.8 * shared
                          + rng.normal(size=(N, CLASSES))) * rng.uniform(0.7, 4))
                 for _ in range(rng.integers(4, 13))]  # fmt: skip
        best = min(log_loss(p, labels) for p in probs)
        for k in (2, 5):
            assert greedy(probs, labels, k).val_log_loss <= best + 1e-12, (seed, k)
