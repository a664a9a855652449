"""semiseg command line: train, evaluate, predict, preprocess, check-data, describe.

    python main.py train --method supervised --preset cpu
    python main.py train --method mean_teacher --preset smoke --set train.epochs=3 --out runs/mt
    python main.py train --out runs/mt --resume
    python main.py evaluate runs/mt [--split val] [--tta] [--checkpoint latest] [--data PH2 --format ph2]
    python main.py predict runs/mt scan.nii.gz scan_mask.nii.gz [--tta] [--save-probabilities]
    python main.py describe --method supervised --preset cpu
    python main.py check-data --data data/Task07_Pancreas            # format inferred and printed
    python main.py preprocess --data data/Task07_Pancreas --preset pancreas_mean_teacher   # train's preset

Thin on purpose: it parses, builds and calls. Exit codes: 0 done, 2 bad input (config, data, run
folder), 74 a file could not be written (disk full, quota, permissions: "error: cannot write PATH:
REASON"; the previous version of that file or checkpoint is kept, so `--resume` works once there
is room; not requeued), 75 preempted (checkpoint written; the sbatch scripts requeue on it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from semiseg import __version__, config  # noqa: E402
from semiseg.startup import quiet_tensorflow_import  # noqa: E402
from semiseg.runs.atomic_write import WriteError  # noqa: E402
from semiseg.config import ConfigError  # noqa: E402
from semiseg.data.sources import DataError  # noqa: E402
from semiseg.runs.run_dir import RunDirError  # noqa: E402

EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 74      # EX_IOERR (sysexits.h)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _apply_data_args(cfg, args) -> None:
    if getattr(args, "data", None):
        cfg.data.path = args.data
        if cfg.data.format == "synthetic":
            cfg.data.format = "auto"
    if getattr(args, "format", None):
        cfg.data.format = args.format
    config.validate(cfg)        # --format is a choice like data.format


def _resolve_train_config(args):
    """(config, run folder or None, resume plan or None). A resume takes everything from the run
    (resume.py: what may change, what is refused, when nothing is left to train)."""
    if args.resume:
        from semiseg import resume
        plan = resume.plan_resume(args)
        return plan.cfg, plan.run, plan
    cfg = config.resolve(args.preset or "", args.config or "", args.set, args.method)
    _apply_data_args(cfg, args)
    if cfg.method == "mira_u" and cfg.mira_u.teacher_checkpoint and not Path(cfg.mira_u.teacher_checkpoint).exists():
        raise ConfigError(f"mira_u.teacher_checkpoint: {cfg.mira_u.teacher_checkpoint} does not exist")
    return cfg, None, None


def _check_replicas(cfg, strategy) -> None:
    """The global batch splits evenly over the replicas; known only once the strategy exists."""
    replicas = strategy.num_replicas_in_sync
    if cfg.train.batch_size % replicas:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} (global, all replicas together) is not "
                          f"divisible by the {replicas} replicas of this strategy; choose a multiple of {replicas}")
    if cfg.train.jit_compile and replicas > 1 and any("CPU" in d for d in strategy.extended.worker_devices):
        # Measured (TF 2.21): "Collectives are not yet implemented for CPU devices when compiling
        # with XLA" across workers, and a device error across logical CPUs of one process.
        raise ConfigError(f"train.jit_compile: XLA cannot compile the all-reduce of {replicas} CPU replicas; "
                          f"set train.jit_compile=false or train on one replica")


def _check_file_sharding_resume(cfg, run, info: dict) -> None:
    """Under data.shard_policy=file each worker streams its share of the cache files, a function of
    the worker count: a resumed run continues its streams only with the workers it trained with."""
    if run is None or cfg.data.shard_policy != "file":
        return
    try:
        before = json.loads((Path(run) / "run_info.json").read_text()).get("strategy", {}).get("num_workers", 1)
    except (OSError, ValueError):
        return
    now = info.get("num_workers", 1)
    if before != now:
        raise ConfigError(f"data.shard_policy=file: run {run} was trained by {before} worker(s), this job has "
                          f"{now}; its data streams continue only with {before} (data.shard_policy=record "
                          f"does not depend on the worker count)")


def cmd_train(args) -> int:
    cfg, run, plan = _resolve_train_config(args)
    if plan is not None and plan.nothing_to_train:
        _log(plan.nothing_to_train)     # before TensorFlow loads; no file of the run is touched
        return 0
    from semiseg.training import distribute
    distribute.catch_preemption_signals_early()     # SIGUSR1 during start-up: save, not die
    # The strategy comes before any other TF op (multi-worker collectives are configured at init).
    try:
        strategy, info = distribute.make_strategy(cfg.train.distribution, collective=cfg.train.collective)
    except ValueError as err:       # nccl without GPUs, GPUs that do not split between a node's tasks
        raise ConfigError(str(err)) from err
    _check_replicas(cfg, strategy)
    _check_file_sharding_resume(cfg, run, info)
    chief = info.get("is_chief", True)
    if run is None and args.out and Path(args.out).exists() and chief:
        raise RunDirError(f"run folder {args.out} already exists: pass --resume to continue it, "
                          f"or choose another --out (nothing in it was changed)")
    import keras
    from semiseg.data import loader as data_loader_tf2
    from semiseg.data import splits as data_splits
    from semiseg.runs import run_dir as rundir
    from semiseg.methods import get_method
    from semiseg.training.trainer import EXIT_PREEMPTED
    from semiseg.evaluation import evaluate as evaluation

    from semiseg import precision as precisions
    policy, why = precisions.resolve(cfg.train.precision)
    if info.get("num_workers", 1) > 1:      # one precision for the whole job, whatever each node has
        policy, why = precisions.agree_across_workers(cfg.train.precision, policy, why,
                                                      lambda flag: distribute.any_worker_true(strategy, flag))
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(cfg.seed)
    method_cls = get_method(cfg.method)
    _log(f"semiseg: method={cfg.method} preset={cfg.preset or '-'} strategy={info.get('strategy')} "
         f"replicas={strategy.num_replicas_in_sync} global_batch={cfg.train.batch_size} precision={policy} ({why})")
    # Data first: an unusable data set stops here, before a run folder exists.
    bundle = data_loader_tf2.prepare_data(cfg, run_dir=run, log=_log if chief else (lambda m: None),
                                          progress=chief and not args.no_progress)
    # One input pipeline per worker (distribute_datasets_from_function).
    bundle.check_shard_policy(info.get("num_workers", 1),
                              ["labeled"] + (["unlabeled"] if config.METHODS[cfg.method].uses_unlabeled else []))
    if args.dry_run:
        from semiseg.training import dry_run
        dry_run.report(cfg, bundle, strategy, info, method_cls, steps=args.dry_run_steps, log=_log)
        return 0
    if run is None:
        out = args.out
        if out is None and info.get("num_workers", 1) > 1:
            # Every worker must name the same folder; a timestamped default would differ per worker.
            if not os.environ.get("SLURM_JOB_ID"):
                raise RunDirError("multi-worker training needs --out RUN_DIR on a file system all workers see")
            out = f"runs/{cfg.method}-{cfg.preset or 'custom'}-job{os.environ['SLURM_JOB_ID']}"
        run = rundir.create_run_dir(out, cfg.method, cfg.preset) if chief else Path(out)
    data_set = data_loader_tf2.data_set_name(cfg.data, bundle.fmt)
    if chief:
        config.save_yaml(cfg, run / "config.yaml")
        data_splits.save_splits(bundle.splits, run / "splits.json")
        import tensorflow as tf
        devices = [d.name for d in tf.config.list_logical_devices()]
        rundir.start_run_info(run, {**rundir.provenance(args.argv, devices, info),
                                    **rundir.run_fields(run, cfg, bundle.fmt, data_set, None),
                                    "data": {"format": bundle.fmt, "path": data_set, "cache": str(bundle.cache_dir),
                                             **{f"n_{s}": len(bundle.splits[s]) for s in data_splits.SPLITS}},
                                    # config.yaml keeps what was asked ("auto"); this is what ran
                                    "precision": policy, "precision_reason": why},
                              changed=plan.changes if plan is not None else None)
    _log(f"run folder: {run}  (labeled {len(bundle.splits['labeled'])}, unlabeled {len(bundle.splits['unlabeled'])}, "
         f"val {len(bundle.splits['val'])}, test {len(bundle.splits['test'])} cases)")
    trainer = method_cls(cfg, bundle, strategy, info, log=_log if chief else (lambda m: None))
    if chief:       # now, not at export: evaluate/predict of an unfinished run read it too
        rundir.write_export_record(run, trainer.export_record())
        rundir.update_run_info(run, network=trainer.export_record()["network"])
    _log(f"strategy: {json.dumps(info)}; per-replica batch {trainer.per_replica_batch}")
    ckpt_dir = Path(distribute.worker_checkpoint_dir(str(run), info))
    reason = trainer.fit(run, is_chief=chief, ckpt_dir=ckpt_dir, progress=not args.no_progress)
    distribute.remove_worker_checkpoint_dir(str(ckpt_dir), info)
    if reason == "preempted":
        if chief:
            rundir.finish_run_info(run, "preempted")
        distribute.wait_for_all_workers(strategy, info)     # no exit before the chief's writes end
        return EXIT_PREEMPTED
    if not chief:
        return 0
    name = trainer.export_model()[0]
    best = keras.saving.load_model(run / "best_model.keras", compile=False)
    payload = evaluation.evaluate(best, bundle, "test", cfg.train.eval_batch_size, out_dir=run, model_name=name,
                                  run_fields=rundir.run_fields(run, cfg, bundle.fmt, data_set, name))
    rundir.finish_run_info(run, reason, best_val_dice=float(trainer.best_score.numpy()), test_dice=payload["dice"])
    _log(f"\n{reason}: test Dice {payload['dice']:.4f}  IoU {payload['iou']:.4f}  ({payload['n_cases']} cases, "
         f"{name} network, best validation Dice {float(trainer.best_score.numpy()):.4f})")
    _log(f"run folder: {run}")
    _log(f"evaluate:   python main.py evaluate {run} [--split val] [--tta]")
    _log(f"predict:    python main.py predict {run} INPUT OUTPUT")
    return 0


def cmd_evaluate(args) -> int:
    """The run's split (test/val) or an external labelled data set (--data), best or latest model.
    Only the default (test split, best model, no TTA) writes RUN_DIR/metrics.json; every other
    evaluation goes to RUN_DIR/eval/<split or external_NAME>[_latest][_tta]/."""
    from semiseg.evaluation import predict
    from semiseg.runs import load as run_load
    run = Path(args.run_dir)
    cfg, model, network = run_load.load_run_model(run, args.checkpoint)
    from semiseg.data import loader as data_loader_tf2
    from semiseg.evaluation import evaluate as evaluation
    if args.data:
        if args.split:
            raise ConfigError("--split names the run's own splits; with --data every labelled case of that "
                              "data set forms the split 'external'")
        bundle = predict.external_bundle(cfg, args.data, args.format, run_load.model_channels(model), log=_log,
                                         progress=not args.no_progress)
        split, name = "external", predict.external_name(args.data)
        data_set = str(Path(args.data).expanduser().resolve())
    else:
        if args.format:
            raise ConfigError("--format needs --data PATH (the external data set to evaluate on)")
        split = args.split or "test"
        bundle = data_loader_tf2.prepare_data(cfg, run_dir=run, log=_log, progress=not args.no_progress)
        name, data_set = split, data_loader_tf2.data_set_name(cfg.data, bundle.fmt)
    default = split == "test" and not args.tta and args.checkpoint == "best"
    suffix = ("_latest" if args.checkpoint == "latest" else "") + ("_tta" if args.tta else "")
    out = run if default else run / "eval" / f"{name}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    from semiseg.runs import run_dir as rundir
    payload = evaluation.evaluate(model, bundle, split, cfg.train.eval_batch_size, tta=args.tta, out_dir=out,
                                  model_name=network, progress=not args.no_progress,
                                  run_fields=rundir.run_fields(run, cfg, bundle.fmt, data_set, network))
    keys = ("dice", "iou", "precision", "recall", "specificity", "hd95", "asd")
    _log(" ".join(f"{k}={payload[k]:.4f}" if payload[k] is not None else f"{k}=nan" for k in keys)
         + f"  n_cases={payload['n_cases']}  ({network} network, {args.checkpoint} checkpoint)")
    _log(f"written: {out / 'metrics.json'}, {out / 'per_case.csv'}")
    return 0


def cmd_predict(args) -> int:
    from semiseg.evaluation import predict
    predict.run_prediction(args.run_dir, args.input, args.output, tta=args.tta, threshold=args.threshold,
                           save_probabilities=args.save_probabilities, checkpoint=args.checkpoint,
                           progress=not args.no_progress, log=_log, save_uncertainty=args.uncertainty)
    return 0


def cmd_describe(args) -> int:
    cfg = config.resolve(args.preset or "", args.config or "", args.set, args.method)
    import keras  # noqa: F401
    from semiseg.methods import get_method
    channels = cfg.data.channels or (1 if cfg.data.format in ("synthetic", "msd") else 3)
    nets = get_method(cfg.method).build_networks(cfg, cfg.data.image_size, channels)
    print(json.dumps({"method": cfg.method, "preset": cfg.preset, "image_size": cfg.data.image_size,
                      "channels": channels, "parameters": {k: int(m.count_params()) for k, m in nets.items()}},
                     indent=1))
    return 0


def cmd_preprocess(args) -> int:
    cfg = config.resolve(args.preset or "", args.config or "", args.set)
    _apply_data_args(cfg, args)
    if args.cache_root:
        cfg.data.cache_dir = args.cache_root
    from semiseg.data import checks as data_checks
    from semiseg.data import cache as slice_cache
    from semiseg.data import sources as data_sources
    fmt, root, cases = data_sources.resolve_source(cfg.data, _log)
    report = data_checks.check_data(fmt, root, cases, cfg.data, workers=args.workers, progress=not args.no_progress)
    _log(report.summary())
    if report.warnings:
        _log(report.table(report.warnings, limit=20))
    report.raise_if_unusable()
    path = slice_cache.build_cache(fmt, cases, cfg.data, progress=not args.no_progress, log=_log, workers=args.workers)
    manifest = slice_cache.load_manifest(path)
    _log(f"slice cache ready: key {slice_cache.key_of(path)} at {path} ({manifest['n_slices']} slices of "
         f"{len(manifest['cases'])} cases, {manifest['n_train_slices']} kept for training); train with the "
         f"same data settings (--preset/--config/--set data.*) to reuse it")
    return 0


def cmd_check_data(args) -> int:
    cfg = config.resolve(args.preset or "", args.config or "", args.set)
    _apply_data_args(cfg, args)
    from semiseg.data import checks as data_checks
    from semiseg.data import sources as data_sources
    fmt, root, cases = data_sources.resolve_source(cfg.data, _log)
    report = data_checks.check_data(fmt, root, cases, cfg.data, workers=args.workers, progress=not args.no_progress)
    _log(report.summary())
    _log(report.table(limit=args.limit))
    report.raise_if_unusable()
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser; `prog` None = the name the command was invoked by (sys.argv[0]: `semiseg` for the
    installed command, `main.py` from a checkout), so usage and error lines show what the user typed."""
    parser = argparse.ArgumentParser(prog=prog, description="semiseg: semi-supervised medical image segmentation")
    parser.add_argument("--version", action="version", version=f"semiseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; `main.py COMMAND --help` describes each")

    by_method: dict = {}
    for name, preset in sorted(config.PRESETS.items()):
        if "method" in preset:
            by_method.setdefault(preset["method"], []).append(name)

    def config_args(p, method=True):
        if method:
            p.add_argument("--method", default="", help=(
                f"{', '.join(config.METHODS)}; default: the preset's method where it names one ("
                + "; ".join(f"{', '.join(names)}: {m}" for m, names in by_method.items())
                + "), else supervised (the other presets, pancreas_* included, name none)"))
        p.add_argument("--preset", default="", help=(
            f"named settings, one of: {', '.join(sorted(config.PRESETS))} (smoke: seconds, for wiring checks; "
            f"smoke_multiclass: the same with 2 classes on synthetic CT volumes; "
            f"cpu: a small first run on a CPU; bench, bench_tuned: the label-efficiency benchmark's settings with the "
            f"papers' unlabelled-loss weights / the weights its tuning chose on validation; pancreas_*: the pancreas runs on MSD Task07; isic2016_*: MIRA-U "
            f"on ISIC-2016 at 10-50%% labels; acdc_3, acdc_7: ACDC at 3 or 7 labelled patients, SSL4MIS's "
            f"protocol). Applied first, then --config, then --set"))
        p.add_argument("--config", default="", metavar="FILE.yaml",
                       help="YAML file of overrides in config.yaml's layout (applied after --preset)")
        config.add_set_argument(p)

    def data_args(p):
        p.add_argument("--data", default=None, metavar="PATH",
                       help="data-set folder (default: the embedded synthetic set); its format is inferred unless --format")
        p.add_argument("--format", default=None, metavar="|".join(config.DATA_FORMATS),
                       help="layout of --data (default: inferred from the folder; docs/data.md draws each)")

    methods_text = "methods (--method; each one package semiseg/methods/NAME/, its section NAME.* in the config):\n" + "\n".join(
        f"  {name:<14} {spec.summary}\n  {'':<14} [{spec.paper}]" for name, spec in config.METHODS.items())
    p = sub.add_parser("train", help="train a model (a new run folder, or --resume one)", epilog=methods_text,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    config_args(p)
    data_args(p)
    p.add_argument("--out", default=None, metavar="RUN_DIR",
                   help="the run folder to create (default runs/METHOD-PRESET-TIME); must not exist unless "
                        "--resume. (preprocess's --cache-root is a cache folder, not a run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the configuration, check the data (building or reusing its slice cache), print "
                        "the splits, steps per epoch, total steps, parameter counts, a memory estimate and a time "
                        "estimate from a few timed steps on this machine; writes no run folder")
    p.add_argument("--dry-run-steps", type=int, default=3, metavar="N",
                   help="training steps timed for --dry-run's time estimate (default 3, after one untimed step)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only; batch jobs)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a run's model on a split or an external data set")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder made by train (its config, splits and model)")
    p.add_argument("--split", default=None, choices=["test", "val"], help="the run's split (default test)")
    p.add_argument("--tta", action="store_true", help="average over flips (test-time augmentation)")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"],
                   help="best_model.keras, or the newest checkpoint in RUN_DIR/checkpoints")
    p.add_argument("--data", default=None, help="an external labelled data set (all its cases: split 'external')")
    p.add_argument("--format", default=None, help="format of --data: msd|acdc|isic|ph2|folders|auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only; batch jobs)")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("predict", help="masks for an image, a folder of images, or a NIfTI volume")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder made by train (its exported network is used)")
    p.add_argument("input", help="a picture, a NIfTI volume (.nii/.nii.gz), or a folder of them")
    p.add_argument("output", help="a mask file for one input, else a folder (never overwritten)")
    p.add_argument("--tta", action="store_true", help="average over flips (test-time augmentation)")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground where probability >= this (binary runs; multi-class runs take the argmax class)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write NAME_prob.npy (pictures) / NAME_prob.nii.gz (volumes), float32")
    p.add_argument("--uncertainty", action="store_true",
                   help="MIRA-U runs: also write NAME_uncertainty.npy / .nii.gz, the per-pixel std of the "
                        "teacher's probability over mira_u.mc_samples MC-dropout passes")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"],
                   help="best_model.keras (default), or the newest checkpoint in RUN_DIR/checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("describe", help="JSON: parameter count of each network of a method")
    config_args(p)
    p.set_defaults(fn=cmd_describe)

    def worker_args(p):
        p.add_argument("--workers", type=int, default=0, help="processes (default 0: every available core)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar (batch jobs)")

    p = sub.add_parser("preprocess", help="check a data set and build its slice cache (reused when it matches)")
    config_args(p, method=False)
    data_args(p)
    worker_args(p)
    p.add_argument("--cache-root", "--out", dest="cache_root", default=None, metavar="DIR",
                   help="folder the slice cache goes under (default data.cache_dir, $SEMISEG_CACHE or "
                        "~/.cache/semiseg); train finds it there with --set data.cache_dir=DIR. Not a run "
                        "folder (train --out is); --out is kept as an alias")
    p.set_defaults(fn=cmd_preprocess)

    p = sub.add_parser("check-data", help="validate a data set and print a table of its problems (exit 2 if unusable)")
    config_args(p, method=False)
    data_args(p)
    worker_args(p)
    p.add_argument("--limit", type=int, default=200, help="rows of the problem table to print")
    p.set_defaults(fn=cmd_check_data)
    return parser


def main(argv=None, prog: str | None = None) -> int:
    quiet_tensorflow_import()       # keep TF's C++ start-up log out of run logs (the first line is ours)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except (ConfigError, DataError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_WRITE_FAILED


if __name__ == "__main__":
    sys.exit(main())
