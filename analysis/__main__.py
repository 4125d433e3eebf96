"""python -m analysis: tables and figures from the run records in results/runs/.

    python -m analysis tables                          # table1, table2 and every manifest with runs
    python -m analysis tables --manifest demo
    python -m analysis fig4 --manifest demo --row ks_def_r18
    python -m analysis fig4 --manifest synthetic_table1          # every KS family, mean over seeds
    python -m analysis curves --manifest demo
    python -m analysis learning --manifest demo_ladder   # AP50 vs. on other images, class loss, minutes
    python -m analysis show --manifest demo --row ks_def_r18      # detections of the student and teachers
    python -m analysis attention --manifest demo --row ks_def_r18 # the KS layer's attention, student vs teacher
    python -m analysis mask-page                           # docs/mask_experiment.md from synthetic_mask's records
"""
import argparse
import errno
import sys
from pathlib import Path

from experiments import records

from . import AnalysisError, _reported


def cmd_tables(args):
    from .tables import default_manifests, write_tables

    names = [args.manifest] if args.manifest else default_manifests(args.results)
    for i, name in enumerate(names):
        print(("\n" if i else "") + write_tables(name, args.results), end="")


def cmd_fig4(args):
    from .figures import write_fig4, write_fig4_seeds

    paths = (write_fig4(args.manifest, args.row, args.results) if args.row else
             write_fig4_seeds(args.manifest, args.results))
    for path in paths:
        print(f"wrote {path}")


def cmd_curves(args):
    from .figures import write_curves

    for path in write_curves(args.manifest, args.row, args.results):
        print(f"wrote {path}")


def cmd_learning(args):
    from .learning import write_learning

    print(write_learning(args.manifest, args.results), end="")


def cmd_show(args):
    from .pictures import write_detections_figure

    branches = args.branches.split(",") if args.branches else None
    for path in write_detections_figure(args.manifest, args.row, args.checkpoint, args.images, args.image_ids, args.score,
                                 branches, args.results):
        print(f"wrote {path}")


def cmd_mask_page(args):
    from .mask_page import write_mask_page

    for path in write_mask_page(args.manifest, args.results, args.out):
        print(f"wrote {path}")


def _point(text):
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x,y in image pixels, got {text!r}") from None
    return x, y


def cmd_attention(args):
    from .pictures import write_attention_figure

    for path in write_attention_figure(args.manifest, args.row, args.checkpoint, args.image_id, args.points, args.per_head,
                                args.results):
        print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    results_help = "results folder holding runs/<manifest>/<row>/; outputs go under it (default: %(default)s)"
    manifest_help = "manifest name (experiments/<name>.yaml) or path to a manifest YAML"
    # options that several commands share (argparse parent parsers)
    results_option = argparse.ArgumentParser(add_help=False)
    results_option.add_argument("--results", default=str(records.RESULTS), help=results_help)
    manifest_option = argparse.ArgumentParser(add_help=False)
    manifest_option.add_argument("--manifest", required=True, help=manifest_help)

    p = sub.add_parser("tables", parents=[results_option],
                       help="paper tables next to the reproduced numbers -> results/tables/",
                       description="Writes results/tables/<manifest>.{md,csv,tex} and prints the markdown. "
                                   "A manifest whose rows point at paper rows gives the paper's table with the "
                                   "reproduced numbers; table1/table2 without a manifest give the paper's table "
                                   "alone; any other manifest gives one line per row (plus teacher branches).")
    p.add_argument("--manifest", help=manifest_help + "; default: table1, table2 and every other manifest "
                                      "with records under <results>/runs/")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("fig4", parents=[manifest_option, results_option],
                       help="AP per epoch of baseline, Attn1, Attn2, Attn3 (paper Fig. 4)",
                       description="Draws AP (percent) against epoch for the row's baseline (its `baseline` row) "
                                   "and the row's student Attn1 and teachers Attn2/Attn3 from log.jsonl; writes "
                                   "results/figures/<manifest>_<row>_fig4.{png,pdf}. Without --row: one panel "
                                   "per group of KS seed rows (rows that differ only in train.seed), the mean "
                                   "over the seeds with their range shaded, in <manifest>_fig4.{png,pdf}.")
    p.add_argument("--row", help="the (KS) row to draw (default: every KS seed group, over seeds)")
    p.set_defaults(func=cmd_fig4)

    p = sub.add_parser("curves", parents=[manifest_option, results_option],
                       help="training losses per run against epoch",
                       description="Draws the total and per-branch training losses (loss, loss_attn1/2/3) of each "
                                   "row against epoch, one subplot per row; writes results/figures/"
                                   "<manifest>_curves.{png,pdf} (<manifest>_<row>_curves with --row).")
    p.add_argument("--row", help="only this row (default: every row with a finished epoch)")
    p.set_defaults(func=cmd_curves)

    p = sub.add_parser("learning", parents=[manifest_option, results_option],
                       help="did training learn: AP50 against AP50 on other images, class loss, minutes",
                       description="One line per row: the student's AP50, the AP50 of its detections moved to "
                                   "other images (train.eval_moved) and their ratio, the teachers' AP50, the class "
                                   "loss of the first and last epoch and the run's minutes; writes results/tables/"
                                   "<manifest>_learning.{md,csv} and prints the markdown.")
    p.set_defaults(func=cmd_learning)

    def checkpoint_options(p, row_help):
        """The options of the commands that draw a trained row's checkpoint (besides --manifest, --results)."""
        p.add_argument("--row", required=True, help=row_help)
        p.add_argument("--checkpoint", help="checkpoint file (default: the row's checkpoint.pth)")

    p = sub.add_parser("show", parents=[manifest_option, results_option],
                       help="detections of a trained row on validation images, one column per branch",
                       description="Draws validation images with the row's post-processed detections (class and "
                                   "score) over the ground truth, one column per branch: the student Attn1 and, "
                                   "for a KS row, the teachers Attn2/Attn3 evaluated with ground-truth masks. Writes "
                                   "<results>/figures/<manifest>_<row>_detections.{png,pdf}.")
    checkpoint_options(p, "the trained row")
    p.add_argument("--images", type=int, default=8, help="the first N validation images (default: %(default)s)")
    p.add_argument("--image-ids", type=int, nargs="+", metavar="ID", help="these validation image ids instead")
    p.add_argument("--score", type=float, default=0.3, help="smallest score drawn (default: %(default)s)")
    p.add_argument("--branches", help="comma-separated branches to draw, e.g. attn1,attn3 (default: all of the row)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("attention", parents=[manifest_option, results_option],
                       help="the KS layer's attention for a few query tokens, student vs. teacher",
                       description="For one validation image and a few query tokens (on the largest objects and "
                                   "on the background, or --points), draws the KS layer's student attention A and "
                                   "the teacher's A^t (Attn3, computed from X^t + P with the GT mask) over the image "
                                   "(deformable layers: the sampling points with student and teacher weights), the "
                                   "GT Fg-Bg mask on the token grid and the tokens the sMLP changes. Writes "
                                   "<results>/figures/<manifest>_<row>_attention_<image id>.{png,pdf}.")
    checkpoint_options(p, "the trained KS row")
    p.add_argument("--image-id", type=int, help="validation image id (default: the first with two objects or more)")
    p.add_argument("--points", type=_point, nargs="+", metavar="X,Y",
                   help="query points in original-image pixels (default: two objects and the background)")
    p.add_argument("--per-head", action="store_true",
                   help="one row per attention head instead of their mean (standard-attention KS layers only)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("mask-page", help="results page of the mask experiment (P1, P2, secondary, figures)",
                       description="Writes the Markdown results page of the mask experiment (experiments/"
                                   "synthetic_mask.yaml: baseline, KS with the GT mask and KS told nothing, per "
                                   "trunk and seed): the pre-registered tests (the mask's effect per trunk, paired "
                                   "t with Holm over the trunks; the trunk x mask interaction, Welch), the answers "
                                   "they give, the secondary tables, and images/<page>_forest.png and "
                                   "images/<page>_curves.png beside the page. Only finished runs count; the page "
                                   "says how many pairs each comparison has.")
    p.add_argument("--manifest", default="synthetic_mask", help=manifest_help + " (default: %(default)s)")
    p.add_argument("--results", default=str(records.RESULTS),
                   help="results folder holding runs/<manifest>/<row>/ (default: %(default)s)")
    p.add_argument("--out", default="docs/mask_experiment.md",
                   help="the page; its figures go to images/ beside it (default: %(default)s)")
    p.set_defaults(func=cmd_mask_page)

    args = parser.parse_args(argv)
    from experiments.config import ConfigError
    from experiments.errors import RunError

    _reported.clear()  # each command names every damaged record it reads once
    results = Path(args.results)
    if results.exists() and not results.is_dir():
        print(f"error: --results {results} is a file; expected the results folder holding runs/<manifest>/<row>/",
              file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (AnalysisError, ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that cannot be written (a file in the way, permissions, full disk)
        if not (isinstance(e, (NotADirectoryError, IsADirectoryError, PermissionError))
                or e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT)):
            raise
        print(f"error: cannot use {e.filename or results}: {e.strerror or e} (--results {results})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
