"""A study's trials and ensembles compared: rows read from its runs, tables, plots and the markdown report."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from emnist_exp.errors import UserError
from emnist_exp.spec import TrialSpec

FOLDER = "report"  # artifact folder in the study's parent run
HYPERPARAMETERS = [f.name for f in dataclasses.fields(TrialSpec)]
SWITCHES = {"augment": ("augmentation", "augmentation.png"), "batch_norm": ("batch norm", "batch_norm.png")}
# The summary table: (column, header). Everything else is in each run's params in `mlflow ui`.
SUMMARY = [("trial", "trial"), ("state", "state"), ("arch", "arch"), ("augment", "aug"), ("batch_norm", "bn"),
           ("dropout", "dropout"), ("width", "width"), ("learning_rate", "lr"), ("batch_size", "batch"),
           ("schedule", "schedule"), ("label_smoothing", "smoothing"), ("val_accuracy", "val_acc"),
           ("test_accuracy", "test_acc")]


def parse_value(text: str):
    """An MLflow param (always a string) back to the bool, int, float or str it was."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def trial_rows(runs) -> list[dict]:
    """One row per trial run: number, state, hyperparameters, accuracies (NaN when not logged); by number."""
    from emnist_exp.tracking.tags import STATE_TAG, TRIAL_TAG  # noqa: PLC0415

    rows = []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        rows.append({"trial": int(tags.get(TRIAL_TAG, -1)), "run_id": run.info.run_id,
                     "name": run.info.run_name or run.info.run_id[:8],
                     "state": tags.get(STATE_TAG, run.info.status),
                     **{p: parse_value(params[p]) for p in HYPERPARAMETERS if p in params},
                     "val_accuracy": metrics.get("val_accuracy", math.nan),
                     "test_accuracy": metrics.get("test_accuracy", math.nan)})
    return sorted(rows, key=lambda r: r["trial"])


def member_label(run_name: str) -> str:
    """A trial's architecture and number for a bar label: "vgg5-32 noaug bn drop0.3 #002" -> "vgg5-32 #002"."""
    words = run_name.split(" ")
    return " ".join(words[:1] + words[-1:]) if len(words) > 1 else run_name


def ensemble_rows(runs) -> list[dict]:
    """One row per ensemble run (newest first), with its members' accuracies."""
    rows = []
    for run in runs:
        members = [m for m in run.data.tags.get("ensemble.members", "").split(",") if m]
        metrics = run.data.metrics
        rows.append({"name": run.info.run_name or run.info.run_id[:8], "run_id": run.info.run_id,
                     "strategy": run.data.params.get("strategy", "?"), "members": members,
                     "member_val": [metrics.get(f"member_{i}_val_accuracy", math.nan) for i in range(len(members))],
                     "member_test": [metrics.get(f"member_{i}_test_accuracy", math.nan) for i in range(len(members))],
                     **{k: metrics.get(k, math.nan) for k in ("val_accuracy", "test_accuracy",
                                                              "test_gain_over_best_member")}})
    return rows


def distilled_rows(runs) -> list[dict]:
    """One row per distilled student (newest first), with its teacher's and the teacher's best member's numbers."""
    rows = []
    for run in runs:
        m = run.data.metrics
        rows.append({"name": run.info.run_name or run.info.run_id[:8], "run_id": run.info.run_id,
                     "teacher": run.data.tags.get("distill.teacher", ""),
                     **{k: m.get(k, math.nan) for k in (
                         "val_accuracy", "test_accuracy", "param_count", "student_images_per_second",
                         "teacher_val_accuracy", "teacher_test_accuracy", "teacher_param_count",
                         "teacher_images_per_second", "best_member_val_accuracy", "best_member_test_accuracy",
                         "best_member_param_count")}})
    return rows


def distilled_table(students: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Each student under its teacher ensemble and the ensemble's best member: accuracy, size, images/s."""
    def count(value: float) -> str:
        return "" if math.isnan(value) else f"{value:,.0f}"

    header = ["model", "val_acc", "test_acc", "params", "images/s"]
    rows = []
    for s in students:
        for name, prefix, speed in ((f"teacher ensemble {s['teacher'][:8]}", "teacher_", "teacher_images_per_second"),
                                    ("its best member", "best_member_", ""),
                                    (f"student {s['name']}", "", "student_images_per_second")):
            rows.append([name, acc(s[f"{prefix}val_accuracy"]), acc(s[f"{prefix}test_accuracy"]),
                         count(s[f"{prefix}param_count"]), count(s[speed]) if speed else ""])
    return header, rows


def acc(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def fmt(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def summary(trials: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = [h for _, h in SUMMARY]
    rows = [[acc(r[c]) if c.endswith("accuracy") else fmt(r.get(c, "")) for c, _ in SUMMARY] for r in trials]
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ensemble_table(ensembles: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["ensemble", "strategy", "members", "val_acc", "test_acc", "test gain over best member"]
    rows = [[e["name"], e["strategy"], str(len(e["members"])), acc(e["val_accuracy"]), acc(e["test_accuracy"]),
             "" if math.isnan(e["test_gain_over_best_member"]) else f"{e['test_gain_over_best_member']:+.4f}"]
            for e in ensembles]
    return header, rows


def complete(trials: list[dict]) -> list[dict]:
    """The trials whose accuracies compare: finished, neither pruned nor failed."""
    return [r for r in trials if r["state"] == "COMPLETE" and not math.isnan(r["val_accuracy"])]


def groups(trials: list[dict], switch: str) -> dict[str, dict[str, list[float]]]:
    """Accuracies of the trials with the switch off and on (both shown, even when one is empty)."""
    out: dict[str, dict[str, list[float]]] = {"off": {"val": [], "test": []}, "on": {"val": [], "test": []}}
    for r in trials:
        group = out[fmt(bool(r.get(switch)))]
        group["val"].append(r["val_accuracy"])
        group["test"].append(r["test_accuracy"])
    return out


def group_table(grouped: dict[str, dict[str, list[float]]]) -> str:
    def mean(values: list[float]) -> str:
        finite = [v for v in values if not math.isnan(v)]
        return acc(sum(finite) / len(finite)) if finite else ""

    rows = [[g, str(len(s["val"])), mean(s["val"]), acc(max(s["val"], default=math.nan)), mean(s["test"])]
            for g, s in grouped.items()]
    return markdown_table(["setting", "trials", "mean val_acc", "best val_acc", "mean test_acc"], rows)


def varied(trials: list[dict]) -> dict[str, list]:
    """The hyperparameters that took more than one value among the trials, with each trial's value."""
    columns = {p: [r.get(p) for r in trials] for p in HYPERPARAMETERS}
    return {p: values for p, values in columns.items() if len({str(v) for v in values}) > 1}


def figures(trials: list[dict], ensembles: list[dict]) -> dict[str, object]:
    """The report's plots, keyed by artifact path; a plot with nothing to show is left out."""
    from emnist_exp import plots  # noqa: PLC0415

    done = complete(trials)
    out: dict[str, object] = {}
    columns = varied(done)
    if columns:
        out[f"{FOLDER}/hyperparameters.png"] = plots.accuracy_by_param(
            columns, [r["val_accuracy"] for r in done], [r["test_accuracy"] for r in done])
    for switch, (title, name) in SWITCHES.items():
        if done:
            out[f"{FOLDER}/{name}"] = plots.on_off(groups(done, switch), f"{title}: off against on")
    if ensembles:
        latest = ensembles[0]
        names = {r["run_id"]: member_label(r["name"]) for r in trials}
        labels = [names.get(m, m[:8]) for m in latest["members"]] + [f"ensemble ({latest['strategy']})"]
        out[f"{FOLDER}/ensemble_vs_members.png"] = plots.ensemble_vs_members(
            labels, latest["member_val"] + [latest["val_accuracy"]],
            latest["member_test"] + [latest["test_accuracy"]], f"{latest['name']} against its members")
    return out


def markdown(study: str, trials: list[dict], ensembles: list[dict], plots: list[str], parents: int,
             students: list[dict] | None = None) -> str:
    """The report: where it comes from, the trials, the ensembles, the on/off comparisons, the plots."""
    states = {s: sum(r["state"] == s for r in trials) for s in sorted({r["state"] for r in trials})}
    done = complete(trials)
    parts = [
        f"# Study `{study}`",
        f"Written by `python -m emnist_exp.report --study {study}` on {time.strftime('%Y-%m-%d %H:%M')}, from "
        f"{len(trials)} trial runs ({', '.join(f'{n} {s.lower()}' for s, n in states.items())}), "
        f"{len(ensembles)} ensemble run(s) and {parents} worker (parent) run(s). Trials are selected on "
        "validation accuracy; test accuracy is reported, never optimised.",
        "## Trials", markdown_table(*summary(trials)),
        "## Ensembles", markdown_table(*ensemble_table(ensembles)) if ensembles else
        "No ensemble yet: `python -m emnist_exp.ensemble --study " + study + "` votes the best trials into one.",
    ]
    if students:
        parts += ["## Distilled students", "Each student beside its teacher ensemble and the ensemble's best "
                  "member; images/s on validation images in the student's run (the ensemble's exported graph).",
                  markdown_table(*distilled_table(students))]
    for switch, (title, name) in SWITCHES.items():
        if done:
            parts += [f"## {title.capitalize()}: off against on (complete trials)", group_table(groups(done, switch))]
        if name in plots:
            parts.append(f"![{title}]({name})")
    if "hyperparameters.png" in plots:
        parts += ["## Accuracy against each hyperparameter", "Only the hyperparameters that varied; dots are "
                  "trials (circles validation, squares test).", "![hyperparameters](hyperparameters.png)"]
    if "ensemble_vs_members.png" in plots:
        parts += ["## The latest ensemble against its members", "![ensemble](ensemble_vs_members.png)"]
    return "\n\n".join(parts) + "\n"


@dataclass(frozen=True)
class Report:
    """A written report: the rows it was made from and where it went."""

    study: str
    trials: list[dict]
    ensembles: list[dict]
    students: list[dict]
    text: str
    figures: int
    run_id: str
    uri: str


def write_report(study: str | None = None) -> Report:
    """Compare the study's runs (the latest study if none is named) and log the report into its parent run."""
    from emnist_exp.tracking import queries, results  # noqa: PLC0415

    study = study or queries.latest_study()
    if study is None:
        raise UserError("the tracking store has no study yet: run `python -m emnist_exp.train` first.")
    parents = queries.study_runs(study, "study")
    trials = trial_rows(queries.study_runs(study, "trial"))
    if not parents or not trials:
        raise UserError(f"study {study!r} has no {'parent run' if not parents else 'trial runs'} in this "
                        "tracking store: check --study, or MLFLOW_TRACKING_URI.")
    ensembles = ensemble_rows(queries.study_runs(study, "ensemble"))
    students = distilled_rows(queries.study_runs(study, "distilled"))
    figs = figures(trials, ensembles)
    text = markdown(study, trials, ensembles, [p.split("/")[-1] for p in figs], len(parents), students)
    uri = results.log_to_run(parents[0].info.run_id, {f"{FOLDER}/report.md": text}, figs)
    return Report(study, trials, ensembles, students, text, len(figs), parents[0].info.run_id, uri)
