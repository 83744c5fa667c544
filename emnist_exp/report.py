"""Entry point: a study's trials and ensembles compared, as markdown and plots in its parent run."""

from __future__ import annotations

import argparse
import sys

from emnist_exp.errors import cli_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m emnist_exp.report",
        description="Compare a study's trials and ensembles: write report/report.md with PNG plots (accuracy "
        "against each hyperparameter, augmentation and batch norm on against off, the ensemble against its "
        "members) into the study's parent run, and print the summary table.",
    )
    parser.add_argument("--study", default=None, help="Optuna study name (default: the most recent study)")
    return parser.parse_args(argv)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows])


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from emnist_exp import console  # noqa: PLC0415

    console.quiet()
    from emnist_exp import reporting  # noqa: PLC0415

    report = reporting.write_report(args.study)
    print(text_table(*reporting.summary(report.trials)))
    if report.ensembles:
        print()
        print(text_table(*reporting.ensemble_table(report.ensembles)))
    if report.students:
        print()
        print(text_table(*reporting.distilled_table(report.students)))
    print(f"\nreport: {report.uri}/{reporting.FOLDER}/report.md ({report.figures} plots) in run {report.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
