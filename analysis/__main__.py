"""python -m analysis: tables and figures from the run records in results/runs/.

    python -m analysis tables                          # table1, table2 and every manifest with runs
    python -m analysis tables --manifest demo
    python -m analysis fig4 --manifest demo --row ks_def_r18
    python -m analysis curves --manifest demo
    python -m analysis learning --manifest demo_ladder   # AP50 vs. on other images, class loss, minutes
"""
import argparse
import sys

from experiments import records

from . import AnalysisError


def cmd_tables(args):
    from .tables import default_manifests, write_tables

    names = [args.manifest] if args.manifest else default_manifests(args.results)
    for i, name in enumerate(names):
        print(("\n" if i else "") + write_tables(name, args.results), end="")


def cmd_fig4(args):
    from .figures import write_fig4

    for path in write_fig4(args.manifest, args.row, args.results):
        print(f"wrote {path}")


def cmd_curves(args):
    from .figures import write_curves

    for path in write_curves(args.manifest, args.row, args.results):
        print(f"wrote {path}")


def cmd_learning(args):
    from .learning import write_learning

    print(write_learning(args.manifest, args.results), end="")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    results_help = "results folder holding runs/<manifest>/<row>/; outputs go under it (default: %(default)s)"
    manifest_help = "manifest name (experiments/<name>.yaml) or path to a manifest YAML"

    p = sub.add_parser("tables", help="paper tables next to the reproduced numbers -> results/tables/",
                       description="Writes results/tables/<manifest>.{md,csv,tex} and prints the markdown. "
                                   "A manifest whose rows point at paper rows gives the paper's table with the "
                                   "reproduced numbers; table1/table2 without a manifest give the paper's table "
                                   "alone; any other manifest gives one line per row (plus teacher branches).")
    p.add_argument("--manifest", help=manifest_help + "; default: table1, table2 and every other manifest "
                                      "with records under <results>/runs/")
    p.add_argument("--results", default=str(records.RESULTS), help=results_help)
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("fig4", help="AP per epoch of baseline, Attn1, Attn2, Attn3 (paper Fig. 4)",
                       description="Draws AP (percent) against epoch for the row's baseline (its `baseline` row) "
                                   "and the row's student Attn1 and teachers Attn2/Attn3 from log.jsonl; writes "
                                   "results/figures/<manifest>_<row>_fig4.{png,pdf}.")
    p.add_argument("--manifest", required=True, help=manifest_help)
    p.add_argument("--row", required=True, help="the (KS) row to draw")
    p.add_argument("--results", default=str(records.RESULTS), help=results_help)
    p.set_defaults(func=cmd_fig4)

    p = sub.add_parser("curves", help="training losses per run against epoch",
                       description="Draws the total and per-branch training losses (loss, loss_attn1/2/3) of each "
                                   "row against epoch, one subplot per row; writes results/figures/"
                                   "<manifest>_curves.{png,pdf} (<manifest>_<row>_curves with --row).")
    p.add_argument("--manifest", required=True, help=manifest_help)
    p.add_argument("--row", help="only this row (default: every row with a finished epoch)")
    p.add_argument("--results", default=str(records.RESULTS), help=results_help)
    p.set_defaults(func=cmd_curves)

    p = sub.add_parser("learning", help="did training learn: AP50 against AP50 on other images, class loss, minutes",
                       description="One line per row: the student's AP50, the AP50 of its detections moved to "
                                   "other images (train.eval_moved) and their ratio, the teachers' AP50, the class "
                                   "loss of the first and last epoch and the run's minutes; writes results/tables/"
                                   "<manifest>_learning.{md,csv} and prints the markdown.")
    p.add_argument("--manifest", required=True, help=manifest_help)
    p.add_argument("--results", default=str(records.RESULTS), help=results_help)
    p.set_defaults(func=cmd_learning)

    args = parser.parse_args(argv)
    from experiments.config import ConfigError

    try:
        args.func(args)
    except (AnalysisError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
