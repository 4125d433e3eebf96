"""Run configurations: built-in defaults, YAML manifests, command-line overrides, validation.

A run's configuration is built in this order, each level updating the one before:

    DEFAULTS (below: the authors' DAB-DETR-R50 COCO setting)
      -> the manifest's `defaults`            (every row)
      -> the manifest's `families[<family>]`  (the rows of that family)
      -> the row's `config`
      -> command-line overrides `key.sub=value` (recorded in the run's config.yaml and command.txt)

Every level is checked against DEFAULTS: an unknown key, a wrong type, a value below its minimum or
outside its choices (variants, backbones, KS modes, ...) is an error naming the manifest, the row (or
family) and the key. The manifest format (experiments/<name>.yaml: `rows`, `families`, `same_as`,
`paper`, ...): docs/experiments.md, "Manifest format".

`Manifest(name_or_path)`: `.rows` (ordered: name -> row dict), `.row(name)`, `.resolve(name,
overrides)` (the full configuration), `.record_of(name)` ((manifest, row) whose records the row
uses: its own, or its `same_as`).
"""
import copy
import math
import re
from pathlib import Path

import yaml

from models import VARIANTS
from models.backbone import AUTOCAST_DTYPES, BACKBONE_NAMES, EVAL_PADDING, NORMS, STAGES, WEIGHTS
from models.ks_encoder import KS_MODES, TEACHER_LAYERS, TEACHER_MASKS

MANIFEST_DIR = Path(__file__).resolve().parent

DEFAULTS = {
    "model": {
        "variant": "dab_detr",
        "hidden_dim": 256,
        "nheads": 8,
        "enc_layers": 6,
        "dec_layers": 6,
        "dim_feedforward": 2048,
        "dropout": 0.0,
        "activation": "prelu",
        "num_queries": 300,
        "pos_temperature": 20,
        "pos_offset": 0.0,
        "eval_topk": 300,
        # The padding mask in evaluation (models/backbone.py EVAL_PADDING): exact, or the KS-DETR code's
        # off_by_one, or none (detrex's DAB-DETR). decoder_padding_mask: false lets the Conditional/DAB/DN
        # decoder cross-attention attend to padded memory tokens, as detrex's code. docs/authors_code.md.
        "eval_padding": "exact",
        "eval_clip_boxes": False,  # clip detections to the image (detectron2's detector_postprocess)
        "decoder_padding_mask": True,
        # the inverse sigmoid of reference boxes clamps to [eps, 1 - eps]; detrex's eps is 1e-3
        "inverse_sigmoid_eps": 1e-5,
        # weights_path: a relative path is relative to the repository root. drop_path: stochastic depth
        # of a Swin backbone (the authors' Swin-T: 0.1); ResNets have none and ignore it, as pad_to_patch
        # (Swin: pad the image to a multiple of the patch size first, as detectron2's Swin; models/backbone.py).
        # autocast: null (float32) or bfloat16 (the backbone only; see models/backbone.py).
        "backbone": {"name": "resnet50", "weights": "imagenet", "weights_path": None, "freeze_at": 1,
                     "norm": "frozen_bn", "last_stage": "layer4", "drop_path": 0.0, "autocast": None,
                     "pad_to_patch": False},
        "ks": {"mode": "none", "teacher_layers": "last", "mask": "gt"},
        "dab": {"modulate_hw_attn": True, "random_anchor_xy": True, "freeze_anchor_xy": False},
        "dn": {"groups": 5, "label_noise": 0.2, "box_noise": 0.4},
        "deformable": {"num_levels": 4, "n_points": 4, "box_refine": False},
        "loss": {"class_weight": 1.0, "bbox_weight": 5.0, "giou_weight": 2.0, "alpha": 0.25, "gamma": 2.0},
        "matcher": {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "alpha": 0.25, "gamma": 2.0},
    },
    "data": {
        "dataset": "coco",
        "root": None,
        "train_split": "train2017",
        "val_split": "val2017",
        # Explicit paths instead of root/<split> and root/annotations/instances_<split>.json (COCO-format
        # sets that share one image folder or name their annotation files freely). Set both of a part.
        "train_images": None,
        "train_annotations": None,
        "val_images": None,
        "val_annotations": None,
        "synthetic": {"train": 1000, "val": 200, "seed": 0, "size": 256},
        "train_scales": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
        "train_max_size": 1333,
        "crop_resize_scales": [400, 500, 600],
        "crop_size": [384, 600],
        "test_size": 800,
        "test_max_size": 1333,
        "num_workers": 2,
    },
    "train": {
        "epochs": 50,
        "lr_drop": [40],
        "lr": 1e-4,
        "lr_backbone": 1e-5,
        "weight_decay": 1e-4,
        "clip_max_norm": 0.1,
        "batch_size": 2,  # per process (per GPU)
        # The batch of one optimizer step across all processes (the authors': 16). null: whatever
        # batch_size x processes gives. When batch_size x processes is smaller, gradients are
        # accumulated over total_batch_size / (batch_size x processes) steps (recorded in env.json).
        "total_batch_size": None,
        "eval_batch_size": None,  # per process; null: batch_size (the authors evaluate with 1)
        "find_unused_parameters": False,  # DDP: only for models with parameters a step may not use
        "seed": 42,
        "eval_every": 1,
        "eval_teachers": True,
        # Also score the student's detections on other images (`attn1_moved`: equal to its own AP for a
        # detector that ignores its input; see CocoEvaluator.moved_to_other_images).
        "eval_moved": False,
        # Also save a checkpoint every N optimizer steps inside an epoch (null: only after each
        # epoch), so that a preempted or timed-out job loses at most N steps when it resumes.
        "checkpoint_every_iters": None,
        "max_iters_per_epoch": None,  # optimizer steps (of total_batch_size images), for smoke runs
        "max_eval_images": None,
    },
}

# Keys whose default is None: the type they take otherwise.
NULLABLE = {
    "model.backbone.weights": str,
    "model.backbone.weights_path": str,
    "model.backbone.autocast": str,
    "data.root": str,
    "data.train_images": str,
    "data.train_annotations": str,
    "data.val_images": str,
    "data.val_annotations": str,
    "train.max_iters_per_epoch": int,
    "train.max_eval_images": int,
    "train.total_batch_size": int,
    "train.eval_batch_size": int,
    "train.checkpoint_every_iters": int,
}
CHOICES = {
    "model.variant": sorted(VARIANTS),
    "model.activation": ["relu", "prelu", "gelu"],
    "model.eval_padding": list(EVAL_PADDING),
    "model.backbone.name": BACKBONE_NAMES,
    "model.backbone.weights": list(WEIGHTS),
    "model.backbone.norm": sorted(NORMS),
    "model.backbone.last_stage": STAGES,
    "model.backbone.autocast": list(AUTOCAST_DTYPES),
    "model.ks.mode": list(KS_MODES),
    "model.ks.teacher_layers": list(TEACHER_LAYERS),
    "model.ks.mask": list(TEACHER_MASKS),
    "data.dataset": ["coco", "synthetic"],
}
# Smallest allowed value of numeric keys.
MINIMUM = {
    "model.hidden_dim": 1, "model.nheads": 1, "model.enc_layers": 1, "model.dec_layers": 1,
    "model.dim_feedforward": 1, "model.num_queries": 1, "model.eval_topk": 1, "model.dropout": 0.0,
    "model.inverse_sigmoid_eps": 0.0,
    "model.backbone.freeze_at": 0, "model.dn.groups": 0, "model.dn.label_noise": 0.0, "model.dn.box_noise": 0.0,
    "model.deformable.num_levels": 1, "model.deformable.n_points": 1,
    "data.num_workers": 0,
    "train.epochs": 1, "train.batch_size": 1, "train.eval_every": 1, "train.max_iters_per_epoch": 1,
    "train.max_eval_images": 1, "train.lr": 0.0, "train.lr_backbone": 0.0, "train.weight_decay": 0.0,
    "train.clip_max_norm": 0.0, "train.total_batch_size": 1, "train.eval_batch_size": 1,
    "train.checkpoint_every_iters": 1, "model.backbone.drop_path": 0.0,
}
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


ROW_KEYS = ("name", "family", "baseline", "paper", "note", "same_as", "config")
TOP_KEYS = ("description", "defaults_from", "paper_table", "defaults", "families_from", "families", "rows")
PAPER_SOURCES = ("rerun", "cited")
PAPER_DIR = MANIFEST_DIR.parent / "results" / "paper"


class ConfigError(ValueError):
    pass


def paper_rows(table):
    """Number of rows of results/paper/table<table>.csv (None when the file is missing)."""
    path = PAPER_DIR / f"table{table}.csv"
    if not path.is_file():
        return None
    return sum(1 for line in path.read_text().splitlines()[1:] if line.strip())


def _check_paper(paper, where, table=None):
    if paper is None:
        if table is not None:
            raise ConfigError(f"{where}: missing required key 'paper' (the manifest has paper_table: {table}; "
                              f"give {{table: {table}, row: N, source: rerun or cited}})")
        return
    ok = (isinstance(paper, dict) and set(paper) == {"table", "row", "source"}
          and paper["table"] in (1, 2) and isinstance(paper["row"], int) and not isinstance(paper["row"], bool)
          and paper["row"] >= 1 and paper["source"] in PAPER_SOURCES)
    if not ok:
        raise ConfigError(f"{where}: key 'paper' must be {{table: 1 or 2, row: N >= 1, source: "
                          f"{' or '.join(PAPER_SOURCES)}}}, got {paper!r}")
    if table is not None and paper["table"] != table:
        raise ConfigError(f"{where}: key 'paper.table' must be {table} (the manifest's paper_table), "
                          f"got {paper['table']}")
    n = paper_rows(paper["table"])
    if n is not None and paper["row"] > n:
        raise ConfigError(f"{where}: key 'paper.row' is {paper['row']}, but "
                          f"{PAPER_DIR / ('table%d.csv' % paper['table'])} has {n} rows")


def _type_name(t):
    return {float: "a number", int: "an integer", bool: "true/false", str: "a string",
            list: "a list", dict: "a mapping"}.get(t, t.__name__)


def _check_value(key, value, default, where):
    if value is None:
        if default is None or key in NULLABLE:
            return value
        raise ConfigError(f"{where}: key {key!r} may not be null")
    expected = NULLABLE.get(key, type(default))
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}: key {key!r} must be {_type_name(expected)}, got {value!r}")
    if expected is list and default:
        item_type = type(default[0])
        if not all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where}: key {key!r} must be a list of {item_type.__name__} values, got {value!r}")
    items = value if expected is list else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):
        # NaN is never below a minimum, and inf passes it: neither is a usable setting
        raise ConfigError(f"{where}: key {key!r} must be a finite number, got {value!r}")
    if key in MINIMUM and value < MINIMUM[key]:
        raise ConfigError(f"{where}: key {key!r} must be at least {MINIMUM[key]}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: key {key!r} must be one of {CHOICES[key]}, got {value!r}")
    return value


def merge(base, update, where, prefix=""):
    """Deep-merges `update` into a copy of `base`, validating every key against DEFAULTS."""
    if not isinstance(update, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {update!r}")
    out = copy.deepcopy(base)
    for key, value in update.items():
        full = prefix + str(key)
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"{where}: unknown key {full!r} (known keys here: {known})")
        if isinstance(base[key], dict):
            out[key] = merge(base[key], value, where, full + ".")
        else:
            out[key] = _check_value(full, value, DEFAULTS_FLAT[full], where)
    return out


def _flatten(tree, prefix=""):
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, prefix + k + "."))
        else:
            flat[prefix + k] = v
    return flat


DEFAULTS_FLAT = _flatten(DEFAULTS)


def parse_override(text):
    """'train.epochs=2' -> {'train': {'epochs': 2}} (the value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML ({problem}); quote it "
                          f"or write lists as [a, b]") from None
    tree = value
    for part in reversed(key.strip().split(".")):
        tree = {part: tree}
    return tree


def manifest_path(name_or_path):
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MANIFEST_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in MANIFEST_DIR.glob("*.yaml"))
        raise ConfigError(f"manifest {name_or_path!r} not found at {path}; available: {available}")
    return path


def _check_consistency(cfg, where):
    """Checks between keys that the per-key schema cannot express."""
    tc = cfg["train"]
    total, batch = tc["total_batch_size"], tc["batch_size"]
    if total is not None and total % batch:
        raise ConfigError(f"{where}: key 'train.total_batch_size' ({total}) must be a multiple of "
                          f"train.batch_size ({batch})")
    bad = [e for e in tc["lr_drop"] if not isinstance(e, int) or isinstance(e, bool) or e < 1]
    if bad:
        raise ConfigError(f"{where}: key 'train.lr_drop' must list epochs >= 1, got {tc['lr_drop']!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that rejects a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class Manifest:
    """A validated manifest: `name`, `path`, `description`, `paper_table`, `defaults`, `families`,
    `rows` (name -> row dict), `row(name)`, `resolve(row, overrides)`."""

    def __init__(self, name_or_path, _chain=()):
        self.path = manifest_path(name_or_path)
        self.name = self.path.stem
        try:
            doc = yaml.load(self.path.read_text(), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"manifest {self.path}: not valid YAML: {e}") from None
        where = f"manifest {self.path}"
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a mapping with 'rows'")
        unknown = set(doc) - set(TOP_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown top-level keys {sorted(unknown)} "
                              f"(expected {', '.join(TOP_KEYS)})")
        self.description = doc.get("description", "")
        if not isinstance(self.description, str):
            raise ConfigError(f"{where}: key 'description' must be a string, got {self.description!r}")
        self.paper_table = doc.get("paper_table")
        if self.paper_table is not None and self.paper_table not in (1, 2):
            raise ConfigError(f"{where}: key 'paper_table' must be 1 or 2, got {self.paper_table!r}")
        base = DEFAULTS
        parent = self._referenced(doc, "defaults_from", where, _chain)
        if parent is not None:
            base = parent.defaults
        self.defaults = merge(base, doc.get("defaults") or {}, f"{where}, defaults")

        families = doc.get("families")
        if families is not None and (not isinstance(families, dict) or not families):
            raise ConfigError(f"{where}: key 'families' must be a non-empty mapping of name -> configuration, "
                              f"got {families!r}")
        source = self._referenced(doc, "families_from", where, _chain)
        if source is not None:
            inherited = source.family_trees
            both = set(inherited) & set(families or {})
            if both:
                raise ConfigError(f"{where}: families {sorted(both)} are defined here and in 'families_from' "
                                  f"{source.name!r}; define each once")
            families = {**inherited, **(families or {})}
        self.family_trees = dict(families or {})  # as written, for families_from
        self.families = {}
        for fam, tree in (families or {}).items():
            if not isinstance(fam, str) or not ROW_NAME.match(fam):
                raise ConfigError(f"{where}: family name {fam!r} must be letters, digits, '_' or '-'")
            self.families[fam] = merge(self.defaults, tree or {}, f"{where}, family {fam!r}")

        rows = doc.get("rows")
        if not isinstance(rows, list) or not rows:
            raise ConfigError(f"{where}: 'rows' must be a non-empty list")
        self.rows = {}
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "name" not in row:
                raise ConfigError(f"{where}: row {i + 1} must be a mapping with a 'name'")
            name = row["name"]
            if not isinstance(name, str) or not ROW_NAME.match(name):
                raise ConfigError(f"{where}: row {i + 1} name {name!r} must be letters, digits, '_' or '-'")
            if name in self.rows:
                raise ConfigError(f"{where}: duplicate row name {name!r} (rows {list(self.rows).index(name) + 1} "
                                  f"and {i + 1})")
            here = f"{where}, row {name!r}"
            unknown = set(row) - set(ROW_KEYS)
            if unknown:
                raise ConfigError(f"{here}: unknown keys {sorted(unknown)} (expected {sorted(ROW_KEYS)})")
            if self.families:
                if "family" not in row:
                    raise ConfigError(f"{here}: missing required key 'family' (one of {sorted(self.families)})")
                if row["family"] not in self.families:
                    raise ConfigError(f"{here}: key 'family' is {row['family']!r}, not one of this manifest's "
                                      f"families {sorted(self.families)}")
            elif "family" in row:
                raise ConfigError(f"{here}: key 'family' is {row['family']!r} but the manifest defines no 'families'")
            if "note" in row and not isinstance(row["note"], str):
                raise ConfigError(f"{here}: key 'note' must be a string, got {row['note']!r}")
            if "baseline" in row and not isinstance(row["baseline"], str):
                raise ConfigError(f"{here}: key 'baseline' must be a row name, got {row['baseline']!r}")
            _check_paper(row.get("paper"), here, self.paper_table)
            self.rows[name] = row
            _check_consistency(self._merged(name), here)  # validates the row's config now
        shared = {}
        for name, row in self.rows.items():
            if "same_as" in row:
                self._check_same_as(name, row["same_as"], _chain + (self.path,))
                if row["same_as"] in shared:
                    raise ConfigError(f"{where}, row {name!r}: key 'same_as' is {row['same_as']!r}, as for row "
                                      f"{shared[row['same_as']]!r}; two rows cannot be one run")
                shared[row["same_as"]] = name
            if "baseline" in row and row["baseline"] not in self.rows:
                raise ConfigError(f"{where}, row {name!r}: baseline {row['baseline']!r} is not a row of this manifest")
            if row.get("baseline") == name:
                raise ConfigError(f"{where}, row {name!r}: a row cannot be its own baseline")

    def _referenced(self, doc, key, where, chain):
        """The manifest that `key` (defaults_from, families_from) names, or None; ConfigError for a
        value that is not a name or a reference back to a manifest of `chain`."""
        name = doc.get(key)
        if name is None:
            return None
        if not isinstance(name, str):
            raise ConfigError(f"{where}: key {key!r} must be a manifest name, got {name!r}")
        chain = chain + (self.path,)
        if manifest_path(name) in chain:
            raise ConfigError(f"{where}: key {key!r} makes a cycle: "
                              f"{' -> '.join(str(p) for p in chain + (manifest_path(name),))}")
        return Manifest(name, chain)

    def _check_same_as(self, name, target, chain):
        here = f"manifest {self.path}, row {name!r}"
        if not isinstance(target, str) or target.count("/") != 1:
            raise ConfigError(f"{here}: key 'same_as' must be 'manifest/row', got {target!r}")
        other_name, other_row = target.split("/")
        try:
            if manifest_path(other_name) in chain:
                raise ConfigError("it points back at a manifest that refers to it")
            other = Manifest(other_name, chain)
            other.row(other_row)
        except ConfigError as e:
            raise ConfigError(f"{here}: key 'same_as' is {target!r}: {e}") from None
        if "same_as" in other.row(other_row):
            raise ConfigError(f"{here}: key 'same_as' points at {target!r}, which is itself 'same_as' "
                              f"{other.row(other_row)['same_as']!r}; point at the row that holds the records")
        mine, theirs = self._merged(name), other._merged(other_row)
        changed = [k for k in diff(mine, theirs) if k not in new_default_keys(theirs, mine)]
        if changed:
            raise ConfigError(f"{here}: key 'same_as' is {target!r}, but the two configurations differ in "
                              f"{', '.join(changed)}; the rows must be the same run")

    def record_of(self, name):
        """(manifest name, row name) whose run records row `name` uses: its `same_as`, else its own."""
        target = self.row(name).get("same_as")
        return tuple(target.split("/")) if target else (self.name, name)

    def row(self, name):
        if name not in self.rows:
            raise ConfigError(f"manifest {self.path}: no row {name!r}; rows: {list(self.rows)}")
        return self.rows[name]

    def _merged(self, row_name):
        row = self.row(row_name)
        base = self.families[row["family"]] if "family" in row else self.defaults
        return merge(base, row.get("config") or {}, f"manifest {self.path}, row {row_name!r}")

    def resolve(self, row_name, overrides=()):
        """The full configuration of one row, with command-line overrides applied."""
        cfg = self._merged(row_name)
        for text in overrides:
            where = f"override {text!r} (manifest {self.path}, row {row_name!r})"
            try:
                tree = parse_override(text)
            except ConfigError as e:  # its message names the override already
                raise ConfigError(f"{e} (manifest {self.path}, row {row_name!r})") from None
            cfg = merge(cfg, tree, where)
        if overrides:
            _check_consistency(cfg, f"manifest {self.path}, row {row_name!r} with overrides {list(overrides)}")
        return cfg


def flatten(tree, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    return _flatten(tree, prefix)


def new_default_keys(recorded, cfg):
    """Keys present in `cfg` but not in the `recorded` configuration whose value is the default: keys
    added to DEFAULTS after the run started, which do not change it."""
    fr, fc = _flatten(recorded), _flatten(cfg)
    return sorted(k for k in fc if k not in fr and k in DEFAULTS_FLAT and fc[k] == DEFAULTS_FLAT[k])


def diff(a, b, prefix=""):
    """Keys whose values differ between two configuration trees."""
    fa, fb = _flatten(a, prefix), _flatten(b, prefix)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
