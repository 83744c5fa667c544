"""Voting rules over member probabilities (members x examples x classes). Pure numpy."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

from emnist_exp.errors import UserError

STRATEGIES = ("soft", "hard", "weighted", "greedy")
EPS = 1e-7


def soft_vote(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of the members' probabilities (equal weights by default)."""
    probs = np.asarray(probs, dtype=np.float64)
    weights = np.full(len(probs), 1.0 / len(probs)) if weights is None else np.asarray(weights, np.float64)
    return np.tensordot(weights / weights.sum(), probs, axes=1)


def hard_vote(probs: np.ndarray) -> np.ndarray:
    """Majority vote; ties broken by summed probability. Returns vote shares (rows sum to 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    members, _, classes = probs.shape
    votes = np.eye(classes)[probs.argmax(axis=2)].sum(axis=0)  # examples x classes
    # The tie-break term is < 1, so it only orders classes that have the same number of votes.
    winner = (votes + probs.sum(axis=0) / (members + 1)).argmax(axis=1)
    shares = votes / members
    # Make argmax of the returned shares the tie-broken winner.
    shares[np.arange(len(winner)), winner] += EPS
    return shares / shares.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0))))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose highest score is the label's class (NaN for no rows)."""
    return float(np.mean(np.argmax(probs, axis=1) == labels)) if len(labels) else float("nan")


def stack(preds: list[dict[str, np.ndarray]], split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Members' `<split>_probs` as one (members x examples x classes) array, and the labels they share.

    None when a member has no predictions for the split; a UserError when members saw different examples.
    """
    if any(f"{split}_probs" not in p for p in preds):
        return None
    labels = preds[0][f"{split}_labels"]
    if any(not np.array_equal(p[f"{split}_labels"], labels) for p in preds):
        raise UserError(f"members were evaluated on different {split} examples; they cannot vote together.")
    return np.stack([p[f"{split}_probs"] for p in preds]).astype(np.float32), labels.astype(np.int64)


def fit_weights(val_probs: np.ndarray, val_labels: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the soft vote's validation log-loss."""
    val_probs = np.asarray(val_probs, dtype=np.float64)

    def loss(logits: np.ndarray) -> float:
        weights = np.exp(logits - logits.max())
        return nll(soft_vote(val_probs, weights), val_labels)

    start = np.zeros(len(val_probs))
    if len(start) < 3:  # the two methods name their tolerances differently
        method, options = "Nelder-Mead", {"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000}
    else:
        method, options = "Powell", {"xtol": 1e-4, "ftol": 1e-7, "maxiter": 2000}
    result = minimize(loss, start, method=method, options=options)
    weights = np.exp(result.x - result.x.max())
    return weights / weights.sum()


def greedy_weights(val_probs: np.ndarray, val_labels: np.ndarray, rounds: int = 25) -> np.ndarray:
    """Caruana et al. (2004) forward selection with replacement on validation.

    Each round adds the member whose inclusion gives the best validation accuracy (log-loss breaks
    ties); the best ensemble seen over all rounds is kept. Weights are selection counts / total.
    """
    val_probs = np.asarray(val_probs, dtype=np.float64)
    members = len(val_probs)
    counts = np.zeros(members)
    total = np.zeros_like(val_probs[0])
    best_score, best_counts = (-1.0, 0.0), None
    for _ in range(rounds):
        scores = []
        for m in range(members):
            candidate = (total + val_probs[m]) / (counts.sum() + 1)
            scores.append((accuracy(candidate, val_labels), -nll(candidate, val_labels)))
        pick = max(range(members), key=lambda m: scores[m])
        counts[pick] += 1
        total += val_probs[pick]
        if scores[pick] > best_score:
            best_score, best_counts = scores[pick], counts.copy()
    return best_counts / best_counts.sum()


def weights_for(strategy: str, val_probs: np.ndarray, val_labels: np.ndarray) -> np.ndarray | None:
    """The member weights a strategy fits on validation (None: the rule has no weights)."""
    if strategy == "soft":
        return np.full(len(val_probs), 1.0 / len(val_probs))
    if strategy == "weighted":
        return fit_weights(val_probs, val_labels)
    if strategy == "greedy":
        return greedy_weights(val_probs, val_labels)
    if strategy == "hard":
        return None
    raise ValueError(f"unknown strategy {strategy!r}")


def combine(strategy: str, probs: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """The ensemble's class scores (rows sum to 1) for a fitted strategy."""
    return hard_vote(probs) if strategy == "hard" else soft_vote(probs, weights)


def disagreement(probs: np.ndarray) -> np.ndarray:
    """Pairwise share of examples on which two members predict different classes."""
    predicted = np.asarray(probs).argmax(axis=2)
    return (predicted[:, None, :] != predicted[None, :, :]).mean(axis=2)
