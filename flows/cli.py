"""``protonmf``: the command line.

    protonmf demo [--out DIR]                    the whole flow on the embedded default, locally
    protonmf run CONFIG [--set key=value ...]    the whole flow on any config
    protonmf craft CONFIG [--set key=value ...]  CRAFT concepts of every class (configs/demo.yaml works)
    protonmf evaluate MODEL_URI [--config CONFIG | --val URI] [--features STORE_URI] [--json OUT] [--device D]
                                 [--unknown-val-classes error|skip]
                                 (neither: the held-out data its manifest records)
    protonmf explain MODEL_URI IMAGE_URI... [--out DIR] [--intervene CLASS:PROTO,...] [--device D]
    protonmf atlas MODEL_URI --out DIR [--images N] [--device D]   every class's prototypes, as a static site

evaluate and explain compute on --device, by default CUDA if this machine has it, else the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from flows.server import STARTUP_LIMIT  # the standard library only: the checks stay light

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Prefect's temporary server gets longer than its 20 s to come up: a busy machine misses that.
os.environ.setdefault(STARTUP_LIMIT, "90")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _print_result(result: dict) -> None:
    from protonmf.viz import evaluation_lines

    ev = result["evaluation"]
    print()
    print(f"model:            {result['model']}")
    if ev.get("report"):
        print(f"report:           {ev['report']}")
    print(f"classes:          {result['classes']}")
    if "work" in result:
        w = result["work"]
        fresh = " (up to date: nothing extracted, fitted or published)" if not any(w.values()) else ""
        print(f"work:             {w['classes_extracted']} classes extracted, {w['groups_fitted']} groups fitted{fresh}")
    if result.get("reads_retried"):
        retried = result["reads_retried"]
        print(f"reads retried:    {sum(retried.values())} (throttled, reset or timed out, then read), in "
              + ", ".join(f"{name} ({n})" for name, n in list(retried.items())[:10]) + (" …" if len(retried) > 10 else ""))
    for line in evaluation_lines(ev):
        print(line)


def _checked(config: str, overrides: list[str]):
    """Read and check the config, its locations and a weights file before Prefect or Ray start:
    what is wrong reaches the user in seconds, in one line. The checked run."""
    from protonmf.config import load_config
    from protonmf.pipeline import Run, check_before_start

    run = Run(load_config(config, overrides))
    check_before_start(run)
    return run


def _run(config, overrides) -> int:
    run = _checked(config, overrides)
    from flows.startup import started_together

    with started_together(run, "flows.build") as (build,):
        result = build.build_prototype_model(config, overrides)
    _print_result(result)
    return 0


def _craft(config, overrides) -> int:
    run = _checked(config, overrides)
    from flows.startup import started_together

    with started_together(run, "flows.craft") as (craft,):
        result = craft.craft_concepts(config, overrides)
    s = result["summary"]
    print()
    print(f"concepts:         {result['concepts']}")
    print(f"classes:          {s['classes']} with concepts, {s['sub_banks']} sub-concept banks, "
          f"{len(s['skipped_classes'])} without predicted images")
    for key, what in (("fidelity", "root banks"), ("sub_fidelity", "sub-concept banks")):
        if key not in s:
            continue
        f = s[key]
        n = f.get("classes", f.get("banks"))
        print(f"  fidelity of the {n} {what}:")
        for r in ("sobol", "tcav"):
            print(f"    {r:<6} ranking: deletion AUC {f[r]['deletion_auc']:.4f}, insertion AUC {f[r]['insertion_auc']:.4f}")
        print(f"    deletion AUC lower with Sobol in {100 * f['sobol_deletion_lower']:.0f}%, with TCAV in "
              f"{100 * f['tcav_deletion_lower']:.0f}%, same order in {100 * f['same_order']:.0f}%; "
              f"TCAV scores strictly between 0 and 1: {100 * f['tcav_scores_between_0_and_1']:.0f}%")
    for m, v in (s.get("localization") or {}).items():
        print(f"  {m:<7} maps: peak on object {v['on_object']:.3f}, purity {v['purity']:.3f}, "
              f"parts covered {v['coverage']:.2f}, IoU {v['iou']:.3f}")
    return 0


def _device(args):
    import torch

    from protonmf.devices import local_device

    if args.device is None:
        return local_device()
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: this machine has no CUDA device")
    return device


def _evaluate(args) -> int:
    from protonmf.config import parse_config
    from protonmf.data import FeatureStore, make_source, relabel_by_name
    from protonmf.evaluation import evaluate_published_model
    from protonmf.pipeline import Run
    from protonmf.prototypes import PrototypeModel

    model = PrototypeModel.load(args.model, map_location=_device(args))
    if args.config:
        from protonmf.config import load_config

        config = load_config(args.config, args.set)
        if args.unknown_val_classes:
            config = parse_config(config.model_dump(), [f"data.unknown_val_classes={args.unknown_val_classes}"])
        run = Run(config)
        source, preprocess = run.source("val", classes=model.class_names), run.preprocess
    elif args.val:
        config = parse_config({"data": {"preprocess": model.preprocess}}) if model.preprocess else parse_config({})
        # the folders' own classes, matched to the model's by name (not by their sorted order)
        source = relabel_by_name(make_source("imagefolder", name="--val", root=args.val), model.class_names,
                                 unknown=args.unknown_val_classes or "error", what="--val")
        preprocess = Run(config).preprocess
    else:
        data = model.settings.get("data")  # the held-out data of the run that published it
        if data is None:  # published before runs recorded it
            raise SystemExit("evaluate: give --val IMAGEFOLDER_URI or --config CONFIG for the held-out images "
                             f"(the model at {args.model} does not record its run's held-out data)")
        source, preprocess = _recorded_held_out(args.model, data, model.class_names)
    features = args.features or (model.settings.get("features") if args.reconstruction else None)
    store = FeatureStore.open(features) if features else None
    result = evaluate_published_model(model, source, preprocess, store=store, study_classes=args.classes)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


def _recorded_held_out(uri: str, data: dict, class_names: list[str]):
    """(held-out source, preprocessing) of the data config a model's manifest records
    (``settings.data``), its classes matched by name to the model's ``class_names``."""
    from protonmf.config import parse_config
    from protonmf.pipeline import Run

    run = Run(parse_config({"data": data}, origin=f"the data recorded in {uri}'s manifest"))
    return run.source("val", classes=class_names), run.preprocess


def _atlas(args) -> int:
    from protonmf.prototypes import PrototypeModel
    from protonmf.viz.atlas import atlas_weights, write_atlas

    model = PrototypeModel.load(args.model, map_location=_device(args))
    source = preprocess = None
    data = model.settings.get("data")
    if args.images > 0 and data is not None:  # the held-out data of the run that published it
        source, preprocess = _recorded_held_out(args.model, data, model.class_names)
    index = write_atlas(model, args.out, source=source, preprocess=preprocess, images_per_class=args.images)
    w = atlas_weights(args.out)
    print(f"atlas:            {index}")
    print(f"pages:            {w['pages']} ({model.num_classes} classes × p in {model.available_p}); index "
          f"{w['index'] / 1e3:.0f} kB, largest page {w['largest_page'] / 1e3:.0f} kB"
          + ("" if source is not None else "; no held-out heatmaps (the model records no held-out data, or --images 0)"))
    return 0


def _explain(args) -> int:
    from protonmf.prototypes import PrototypeModel, parse_interventions
    from protonmf.viz import explain_images

    device = _device(args)
    missing = [uri for uri in args.images if "://" not in uri and not Path(uri).exists()]
    if missing:  # said before the model is read
        raise FileNotFoundError(f"explain: {missing[0]!r} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model = PrototypeModel.load(args.model, map_location=device)
    results = explain_images(model, args.images, args.out, interventions=parse_interventions(args.intervene))
    for r in results:
        if "skipped" in r:
            print(f"{r['image']}: skipped ({r['skipped']})")
            continue
        for name in ("model", "intervened"):
            if name in r:
                m = r[name]
                parts = ", ".join(f"{v:+.3f}" for v in m["contributions"])
                print(f"{r['image']} [{name}]: {m['predicted_name']} (logit {m['logit']:.3f}); prototypes {parts}; "
                      f"residual {m['residual']:+.3f}; bias {m['bias']:+.3f}; picture {m['picture']}")
    print(f"explanations: {args.out}/explanations.json")
    skipped = [r for r in results if "skipped" in r]
    if skipped:  # an input that is not an image is an error, after the others are explained
        print(f"protonmf: error: explain: {len(skipped)} of {len(results)} input(s) not explained: "
              + "; ".join(f"{r['image']}: {r['skipped']}" for r in skipped[:5]), file=sys.stderr)
        return 2
    return 0


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _message(err: BaseException) -> str:
    """What the user reads of an error: the error a Ray task raised rather than Ray's wrapper (its
    remote traceback, in colour, goes to the run's log), without terminal colour codes."""
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the task's own error here
    if isinstance(cause, BaseException):
        err = cause
    return _ANSI.sub("", str(err)).strip()


#: Errors that say what is wrong with the input or the environment: one line, exit status 2.
_USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, RuntimeError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="protonmf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="let errors through with their whole traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole flow on the embedded default (synthetic parts, demo CNN)")
    demo.add_argument("--out", default="out/demo", help="where the feature store and the model go (default out/demo)")
    run = sub.add_parser("run", help="run the whole flow on a config")
    run.add_argument("config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--verify", action="store_true",
                     help="read every extracted class back against its checksums, extracting again what is damaged "
                          "(storage.verify); a rerun otherwise trusts the markers and the listing")
    cr = sub.add_parser("craft", help="CRAFT concepts of every class: importance, sub-concepts, maps, figures")
    cr.add_argument("config")
    cr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ev = sub.add_parser("evaluate", help="evaluate a published model against its black box")
    ev.add_argument("model")
    ev.add_argument("--config", help="config whose validation split to use (default: the held-out data the model's manifest records)")
    ev.add_argument("--val", help="an ImageFolder URI of held-out images (class folders named as the model's classes)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--unknown-val-classes", choices=["error", "skip"],
                    help="a held-out class the model does not know: an error (default), or skip its images (counted in the JSON)")
    ev.add_argument("--features", help="feature store URI: add Table 1 / Figure 5 reconstruction errors and seed stability")
    ev.add_argument("--reconstruction", action="store_true", help="the same, from the store the model was fitted on")
    ev.add_argument("--classes", type=int, default=50, help="classes used for the reconstruction study (default 50)")
    ev.add_argument("--json", help="also write the result to this file")
    ev.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    ex = sub.add_parser("explain", help="explain images: contributions, prototype areas, interventions")
    ex.add_argument("model")
    ex.add_argument("images", nargs="+")
    ex.add_argument("--out", default="out/explain")
    ex.add_argument("--intervene", default="", help="CLASS:PROTO,... prototypes to remove (class index or name)")
    ex.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    at = sub.add_parser("atlas", help="a static site of every class's prototypes (searchable index, a page per class and p)")
    at.add_argument("model")
    at.add_argument("--out", required=True, help="folder (local or URI) the atlas goes to")
    at.add_argument("--images", type=int, default=3,
                    help="held-out heatmaps per class, from the held-out data the model's manifest records (0: none)")
    at.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present, else cpu)")
    args = parser.parse_args(argv)

    try:
        return _command(args)
    except BaseExceptionGroup as group:  # classes that failed apart (tasks.extract.ClassesFailed)
        if args.debug or group.split(_USER_ERRORS)[1] is not None:  # a bug among them: its traceback
            raise
        print(f"protonmf: error: {_ANSI.sub('', group.message)}", file=sys.stderr)
        for err in group.exceptions:
            print(f"  {_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line; --debug for the traceback
        if args.debug:
            raise
        if isinstance(err, _USER_ERRORS) or isinstance(getattr(err, "cause", None), _USER_ERRORS):
            print(f"protonmf: error: {_message(err)}", file=sys.stderr)
            return 2
        print(f"protonmf: error: {type(err).__name__}: {_message(err)} (protonmf --debug ... shows the traceback)",
              file=sys.stderr)
        return 1


def _command(args) -> int:
    if args.command == "demo":
        demo_config = CONFIGS / "demo.yaml"
        if not demo_config.is_file():
            raise FileNotFoundError(f"the embedded demo config {demo_config} is missing (run from a checkout)")
        out = args.out.rstrip("/")
        return _run(str(demo_config), [f"storage.features={out}/features", f"storage.model={out}/model",
                                        f"storage.concepts={out}/concepts"])
    if args.command == "run":
        return _run(args.config, args.set + (["storage.verify=true"] if args.verify else []))
    if args.command == "craft":
        return _craft(args.config, args.set)
    if args.command == "explain":
        return _explain(args)
    if args.command == "atlas":
        return _atlas(args)
    return _evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
