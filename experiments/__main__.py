"""python -m experiments: run and inspect the rows of the experiment manifests.

    python -m experiments list demo
    python -m experiments run demo                     # every row of experiments/demo.yaml
    python -m experiments run demo --row ks_dab_r18 train.epochs=2
"""
import argparse
import json
import re
import sys

from . import records
from .config import ConfigError, Manifest

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def cmd_list(args):
    manifest = Manifest(args.manifest)
    rows = []
    for name in manifest.rows:
        cfg = manifest.resolve(name)
        m = cfg["model"]
        directory = records.run_dir(manifest.name, name, args.results)
        rows.append({"row": name, "variant": m["variant"], "ks": m["ks"]["mode"], "backbone": m["backbone"]["name"],
                     "epochs": cfg["train"]["epochs"], "status": records.status(directory)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def cmd_run(args):
    from .engine import train_row  # torch import only when needed

    manifest = Manifest(args.manifest)
    rows = args.row or list(manifest.rows)
    for row in rows:
        manifest.row(row)  # fail early on a typo, before any training
    for row in rows:
        print(f"== {manifest.name} / {row}")
        directory = train_row(manifest.name, row, args.overrides, resume=args.resume, force=args.force,
                              device=args.device, results=args.results)
        print(f"== {row}: record in {directory}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(records.RESULTS),
                        help="results folder holding runs/<manifest>/<row>/ (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="rows of a manifest with their status")
    p.add_argument("manifest", help="manifest name (experiments/<name>.yaml) or path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="train and evaluate manifest rows on this machine",
                       description="Train and evaluate rows on this machine (CPU or one GPU), writing "
                                   "results/runs/<manifest>/<row>/. A finished row is skipped.")
    p.add_argument("manifest", help="manifest name (experiments/<name>.yaml) or path")
    p.add_argument("--row", action="append", help="row to run (repeatable; default: every row)")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished run from its last checkpoint (starts fresh if it has none)")
    p.add_argument("--force", action="store_true",
                   help="start over even if a record exists (the old record is moved aside, not deleted)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="configuration overrides, recorded in the run's config.yaml")
    p.set_defaults(func=cmd_run)

    # Overrides may come after options too (`run demo --row x train.epochs=2`), which argparse's
    # positional handling does not allow: collect them from the unrecognised arguments.
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not OVERRIDE.match(a)]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
