"""The ensemble: voting arithmetic against numpy by hand, the logged run, the registered model, evaluate."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from emnist_exp import data, ensemble, evaluate, voting
from emnist_exp.tracking import queries, results
from emnist_exp.errors import UserError
from conftest import TINY_ENSEMBLE_RUN


# ---- the rules on hand-made numbers ------------------------------------------------------------

PROBS = np.array([  # 3 members x 4 examples x 3 classes
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8]],
    [[0.5, 0.4, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]],
    [[0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.2, 0.5], [0.2, 0.7, 0.1]],
])


def test_soft_vote_is_the_mean():
    np.testing.assert_allclose(voting.soft_vote(PROBS), PROBS.mean(axis=0))
    w = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(voting.soft_vote(PROBS, w), 0.5 * PROBS[0] + 0.25 * PROBS[1] + 0.25 * PROBS[2])


def test_hard_vote_majority_with_ties_broken_by_summed_probability():
    # example 0: votes 0,0,1 -> 0; example 1: votes 1,0,2 (three-way tie) -> summed probs 0.9,1.0,1.1 -> 2;
    # example 2: votes 0,2,2 -> 2; example 3: votes 2,1,1 -> 1
    assert list(voting.hard_vote(PROBS).argmax(axis=1)) == [0, 2, 2, 1]
    np.testing.assert_allclose(voting.hard_vote(PROBS).sum(axis=1), 1.0)


def test_weighted_fit_beats_or_matches_equal_weights_on_validation():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    good = np.eye(5)[labels] * 0.6 + 0.08
    noise = rng.dirichlet(np.ones(5), size=(2, 300))
    probs = np.stack([good, noise[0], noise[1]])
    weights = voting.fit_weights(probs, labels)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0)
    assert weights[0] > 0.8  # the informative member dominates
    assert voting.nll(voting.soft_vote(probs, weights), labels) <= voting.nll(voting.soft_vote(probs), labels)


def caruana_by_hand(probs, labels, rounds=25):
    chosen, best, best_chosen = [], None, None
    for _ in range(rounds):
        def score(m):
            avg = np.mean([probs[i] for i in chosen + [m]], axis=0)
            hit = np.mean(avg.argmax(1) == labels)
            ll = -np.mean(np.log(np.clip(avg[np.arange(len(labels)), labels], 1e-7, 1)))
            return (hit, -ll)
        m = max(range(len(probs)), key=score)
        chosen.append(m)
        if best is None or score_of(chosen, probs, labels) > best:
            best, best_chosen = score_of(chosen, probs, labels), list(chosen)
    counts = np.bincount(best_chosen, minlength=len(probs))
    return counts / counts.sum()


def score_of(chosen, probs, labels):
    avg = np.mean([probs[i] for i in chosen], axis=0)
    ll = -np.mean(np.log(np.clip(avg[np.arange(len(labels)), labels], 1e-7, 1)))
    return (np.mean(avg.argmax(1) == labels), -ll)


def test_greedy_is_caruana_forward_selection_with_replacement():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    probs = np.stack([0.5 * np.eye(4)[labels] * rng.random((200, 1)) + rng.dirichlet(np.ones(4), 200)
                      for _ in range(4)])
    probs /= probs.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(voting.greedy_weights(probs, labels), caruana_by_hand(probs, labels))


# ---- on a real tiny study ----------------------------------------------------------------------


def members_of(run) -> list[str]:
    return run.data.tags["ensemble.members"].split(",")


def stacked(run_ids, split):
    preds = [results.load_predictions(r) for r in run_ids]
    return np.stack([p[f"{split}_probs"] for p in preds]).astype(np.float64), preds[0][f"{split}_labels"]


def tiny_ensemble_run(version: str):
    """The run the tiny_ensemble fixture logged: strategy tests log newer ensembles of the same study."""
    return mlflow.get_run(TINY_ENSEMBLE_RUN[version])


def last_ensemble_run():
    return mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                              filter_string="tags.`emnist.role` = 'ensemble'", order_by=["attributes.start_time DESC"])[0]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["soft", "hard", "weighted", "greedy"])
def test_each_strategy_on_a_real_study_matches_numpy(tiny_study, strategy, capsys):
    assert ensemble.main(["--top", "3", "--study", "tiny", "--strategy", strategy, "--pool", "3",
                          "--no-register"]) == 0
    run = last_ensemble_run()
    ids = members_of(run)
    val, val_labels = stacked(ids, "val")
    test, test_labels = stacked(ids, "test")
    weights = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/ensemble.json")["weights"]
    if strategy == "soft":
        expected = test.mean(axis=0).argmax(axis=1)
    elif strategy == "hard":
        votes = np.stack([np.bincount(col, minlength=47) for col in test.argmax(axis=2).T])
        expected = (votes + test.sum(axis=0) / (len(ids) + 1)).argmax(axis=1)
    else:
        w = np.asarray(weights)
        assert w.min() > 0 and w.sum() == pytest.approx(1.0)
        expected = np.einsum("m,mnc->nc", w, test).argmax(axis=1)
    assert run.data.metrics["test_accuracy"] == pytest.approx(np.mean(expected == test_labels))
    assert run.data.params["strategy"] == strategy
    for i, rid in enumerate(ids):
        member = results.load_predictions(rid)
        assert run.data.metrics[f"member_{i}_val_accuracy"] == pytest.approx(
            np.mean(member["val_probs"].argmax(1) == member["val_labels"]))
    out = capsys.readouterr().out
    assert f"ensemble ({strategy})" in out and "assembled" in out


@pytest.mark.slow
def test_ensemble_run_logs_tables_plots_and_links_members(tiny_ensemble):
    run = tiny_ensemble_run(tiny_ensemble)
    client = mlflow.tracking.MlflowClient()
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"per_class_accuracy.csv", "pairwise_disagreement.csv", "ensemble.json", "plots"} <= files
    version = client.get_model_version("emnist-ensemble", tiny_ensemble)
    assert version.run_id == run.info.run_id
    assert "mean_pairwise_disagreement" in run.data.metrics and "test_gain_over_best_member" in run.data.metrics
    for rid in members_of(run):
        assert mlflow.get_run(rid).data.tags["emnist.role"] == "trial"
    csv = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/per_class_accuracy.csv").splitlines()
    assert csv[0] == "class,character,support,accuracy" and len(csv) == 48


@pytest.mark.slow
def test_registered_model_reproduces_the_logged_test_accuracy(tiny_ensemble):
    run = tiny_ensemble_run(tiny_ensemble)
    model = mlflow.pyfunc.load_model(f"models:/emnist-ensemble/{tiny_ensemble}")
    splits = data.load_splits("synthetic:1500")
    images = np.stack([x for x, _ in splits.test.as_numpy_iterator()])[..., 0]  # uint8, (n, 28, 28)
    out = model.predict(images)
    assert list(out.columns) == ["image", "rank", "class_index", "character", "probability"]
    assert list(out["image"]) == list(range(len(images))) and set(out["rank"]) == {1}
    accuracy = np.mean(out["class_index"].to_numpy() == data.labels_of(splits.test))
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])
    floats = model.predict(images.astype(np.float32) / 255.0)  # floats in 0..1 are accepted too
    assert np.array_equal(floats["class_index"].to_numpy(), out["class_index"].to_numpy())


@pytest.mark.slow
def test_evaluate_prints_accuracy_last_for_any_model_uri(tiny_ensemble, capsys):
    run = tiny_ensemble_run(tiny_ensemble)
    assert evaluate.main(["--model", f"models:/emnist-ensemble/{tiny_ensemble}", "--dataset", "synthetic:1500"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"accuracy {run.data.metrics['test_accuracy']:.4f}"
    member = members_of(run)[0]
    assert evaluate.main(["--model", f"runs:/{member}/model", "--dataset", "synthetic:1500"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"accuracy {mlflow.get_run(member).data.metrics['test_accuracy']:.4f}"


@pytest.mark.slow
def test_assembly_errors(tiny_study, capsys):
    with pytest.raises(UserError, match="no finished trial runs in study 'nothing-here'"):
        ensemble.main.__wrapped__(["--study", "nothing-here"])
    assert ensemble.main(["--study", "tiny", "--top", "50", "--no-register"]) == 0
    assert "fewer than 50; using them all" in capsys.readouterr().err


@pytest.mark.slow
def test_members_from_different_datasets_are_refused(tiny_study, workdir):
    from emnist_exp import train

    assert train.main(["--dataset", "synthetic:600", "--study", "other", "--n_trials", "1", "--epochs", "1"]) == 0
    mixed = [queries.finished_trials(study="tiny")[0].info.run_id, queries.finished_trials(study="other")[0].info.run_id]
    with pytest.raises(UserError, match="different datasets"):
        ensemble.main.__wrapped__(["--runs", ",".join(mixed)])
    assert ensemble.main(["--runs", ",".join(mixed)]) == 2
