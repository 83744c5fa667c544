"""Entry point: distil a study's ensemble into one student model (`python -m emnist_exp.distill`)."""

from __future__ import annotations

import argparse
import math
import sys

from emnist_exp import console
from emnist_exp.errors import cli_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emnist_exp.distill",
        description="Train one student model on an ensemble's soft targets over the train split (computed once) "
        "and the labels, select it on validation, log it as a run in the study's experiment and register it as "
        "'emnist-distilled'. The recipe is the ensemble's best member's unless changed here.",
    )
    parser.add_argument("--study", default="", help="the teacher is this study's latest ensemble (default: the "
                        "most recent study)")
    parser.add_argument("--ensemble", default="", help="the teacher's ensemble run id, instead of a study's latest")
    parser.add_argument("--arch", default="", help="student architecture: cnn, resnet or vgg5 (default: the best "
                        "member's)")
    parser.add_argument("--width", type=int, default=0, help="student width (default 0: the best member's)")
    parser.add_argument("--epochs", type=int, default=0, help="epochs; the best on validation is kept (default 0: "
                        "the best member's trial's max epochs)")
    parser.add_argument("--temperature", type=float, default=4.0, help="softmax temperature of both distributions "
                        "in the KL term (default: 4)")
    # soft_targets.DEFAULT_ALPHA, written out: importing it would load TensorFlow before --help
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher's KL term; 1 - alpha goes "
                        "to the labels' cross-entropy (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="Keras and tf.data seed (default: 0)")
    parser.add_argument("--precision", default="auto", help="auto (default), float32, mixed_bfloat16 or "
                        "mixed_float16; the logged model is float32 whatever trained it")
    console.add_verbose_flag(parser)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.quiet(verbose=bool(args.verbose))
    from emnist_exp import distillation  # noqa: PLC0415
    from emnist_exp.tracking import experiments, students  # noqa: PLC0415

    options = distillation.Options(study=args.study or None, ensemble=args.ensemble or None, arch=args.arch or None,
                                   width=args.width, epochs=args.epochs, temperature=args.temperature,
                                   alpha=args.alpha, seed=args.seed, precision=args.precision)
    distillation.check(options)  # before TensorFlow and the store: bad input costs no wait
    console.quiet_libraries()
    done = distillation.distil(options)
    teacher = done.teacher
    print(f"teacher {teacher.run.info.run_name} ({teacher.run.info.run_id}); student {done.spec.short_name()}, "
          f"T {options.temperature:g}, alpha {options.alpha:g}")
    print_table(teacher.best.info.run_name, done.metrics, done.result)
    print(f"student run {done.run_id}; registered models:/{students.DISTILLED_MODEL}/{done.version}")
    print(f"runs: {experiments.experiment_url(done.experiment_id)} (`mlflow ui` for a local store)")
    return 0


def print_table(best_member: str, m: dict[str, float], result) -> None:
    rows = [("ensemble (teacher)", m["teacher_val_accuracy"], m.get("teacher_test_accuracy", math.nan),
             m["teacher_param_count"], m["teacher_images_per_second"]),
            (f"best member {best_member}", m["best_member_val_accuracy"], m.get("best_member_test_accuracy", math.nan),
             m["best_member_param_count"], math.nan),
            ("student", result.val_accuracy, result.test_accuracy or math.nan, result.model.count_params(),
             m["student_images_per_second"])]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'model':<{width}} {'val_acc':>8} {'test_acc':>8} {'params':>10} {'images/s':>9}")
    for name, val, test, params, speed in rows:
        print(f"{name:<{width}} {val:>8.4f} {test:>8.4f} {params:>10,.0f} "
              f"{'' if math.isnan(speed) else f'{speed:,.0f}':>9}")


if __name__ == "__main__":
    sys.exit(main())
