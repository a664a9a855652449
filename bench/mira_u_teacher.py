"""Diagnosis: how good can MIRA-U's ViT teacher get on a data set, and so how good are its pseudo labels?

    python bench/mira_u_teacher.py RUN                              # RUN: a MIRA-U run folder
    python bench/mira_u_teacher.py RUN --variants frozen,finetune --steps 1200 --out teacher.json

MIRA-U's student learns from the teacher's pseudo labels, so the teacher has to segment the
unlabelled images better than the student would alone. This script answers that before (or after)
stage 2 is paid for. It reads RUN's saved settings, splits and stage-1 teacher (`teacher_mim.keras`)
and trains the teacher on the run's labelled split alone, with stage 2's head loss (L_head: the
run's Dice + BCE/CE weights) on the run's labelled stream (strong views, MIRA-U's, unless the run set
`train.labeled_augment`), the run's `train.lr`, `train.batch_size` and Adam, for --steps steps, in
three variants:

  frozen    stage 2 as the seed has it: the MIM encoder frozen, the segmentation head trained
  finetune  encoder and head trained (not the seed: what the labelled images could give the teacher)
  scratch   encoder and head trained from random weights (what stage 1's pretraining buys)

Every --eval-every steps it records the deterministic teacher's per-case validation Dice
(`val_dice`, as training selects models) and, where the unlabelled cases carry hidden truth (the
embedded synthetic set, or `data.hide_labels=true`), `pseudo_dice`: the Dice of the pseudo labels
stage 2 would train on (M MC-dropout passes, w = exp(-sigma/kappa), pixels with w < tau_u dropped,
y~ = w * mu binarised at 0.5), computed exactly as the run's history.csv computes it, on the first
`mira_u.probe_cases` hidden-truth cases. Compare both with the supervised student's validation Dice:
pseudo labels below it pull the student down. The JSON holds every curve and, per variant, the best
validation Dice and the pseudo Dice at that step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common  # sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

VARIANTS = ("frozen", "finetune", "scratch")


def load_trainer(run: Path):
    """The run's MIRA-U Trainer (its saved config and splits) on the default strategy, or exit
    naming the file that is missing or wrong."""
    from semiseg import config
    from semiseg.errors import ConfigError
    saved = run / "config.yaml"
    if not saved.exists():
        sys.exit(f"{saved}: not found; RUN must be a run folder written by `main.py train --method mira_u`")
    cfg = config.load_saved_config(saved)
    if cfg.method != "mira_u":
        sys.exit(f"{saved}: method is '{cfg.method}', not mira_u; this diagnosis reads a MIRA-U teacher")
    if not (run / "teacher_mim.keras").exists():
        sys.exit(f"{run / 'teacher_mim.keras'}: not found; the run has not finished stage 1 (MIM pretraining)")
    try:        # one process, the default strategy: a diagnosis, not a distributed run
        return common.trainer_for(cfg, "none", run)
    except ConfigError as err:
        sys.exit(f"{saved}: {err}")


def reset_teacher(trainer, variant: str, teacher_file: Path) -> list:
    """Put the stage-1 weights (frozen, finetune) or fresh random ones (scratch) into the teacher;
    returns the variables the variant trains."""
    import numpy as np
    from semiseg.methods.mira_u.trainer import load_teacher_into
    from semiseg.models.transformer import MIMTeacher
    teacher = trainer.models["teacher"]
    if variant == "scratch":
        fresh = MIMTeacher(**teacher.config_values)
        for dst, src in zip(teacher.weights, fresh.weights):
            dst.assign(src)
    else:
        load_teacher_into(teacher, teacher_file)
    parts = teacher.part_weights()
    chosen = parts["seg_head"] + ([] if variant == "frozen" else parts["encoder"])
    # The mask token only stands in for masked patches in stage 1: no gradient reaches it here.
    trainable = [v for v in chosen if v.trainable and v is not teacher.mask_token]
    assert trainable and all(np.issubdtype(np.dtype(v.dtype), np.floating) for v in trainable)
    return trainable


def train_variant(trainer, variant: str, teacher_file: Path, steps: int, eval_every: int, log=print) -> dict:
    import keras
    import tensorflow as tf
    from semiseg.evaluation import evaluate as evaluation
    from semiseg.training import probe
    from semiseg.training.trainer import augment_fn

    cfg, m, teacher = trainer.cfg, trainer.cfg.mira_u, trainer.models["teacher"]
    keras.utils.set_random_seed(cfg.seed)
    variables = reset_teacher(trainer, variant, teacher_file)
    optimizer = keras.optimizers.Adam(cfg.train.lr)
    stream = iter(trainer.data.train_dataset("labeled", trainer.per_replica_batch, None, 0,
                                             augment_fn(trainer.labeled_augmentation()), stream_id=1,
                                             log=lambda msg: None))

    @tf.function
    def step(images, masks):
        with tf.GradientTape() as tape:
            if variant == "frozen":         # stage 2's L_head: encoder tokens without gradient or dropout
                tokens = tf.stop_gradient(teacher.encode(images, training=False))
                grid = tf.reshape(tokens, [-1, teacher.grid, teacher.grid, teacher.embed_dim])
                logits = teacher.seg_head(grid, training=True)
            else:
                logits = teacher.segment(images, training=True)
            loss = trainer.supervised_loss(logits, masks)[0]
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    pseudo_label = tf.function(trainer.probe_pseudo_label, reduce_retracing=True)     # the run's own probe

    predict = evaluation.make_predict_fn(teacher)
    cases = probe.probe_case_ids(cfg, trainer.data, m.probe_cases)
    curve, t0 = [], time.time()
    for s in range(1, steps + 1):
        images, masks = next(stream)
        loss = step(images, masks)
        if s % eval_every == 0 or s == steps:
            row = {"step": s, "loss": round(float(loss), 4),
                   "val_dice": round(evaluation.mean_case_dice(predict, trainer.data, "val",
                                                               cfg.train.eval_batch_size), 4)}
            if cases:
                logs = probe.pseudo_dice_logs(pseudo_label, cfg, trainer.data, cases, cfg.train.eval_batch_size)
                row["pseudo_dice"] = round(logs["pseudo_dice"], 4)
            row["seconds"] = round(time.time() - t0, 1)
            curve.append(row)
            log(f"[{variant}] " + " ".join(f"{k}={v}" for k, v in row.items()))
    best = max(curve, key=lambda r: r["val_dice"])
    return {"trained_parameters": int(sum(v.shape.num_elements() for v in variables)), "curve": curve,
            "best_val_dice": best["val_dice"], "best_step": best["step"],
            "pseudo_dice_at_best": best.get("pseudo_dice")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a MIRA-U run folder (config.yaml, splits.json, teacher_mim.keras)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=1200, help="training steps per variant (default 1200)")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between scores (default 200)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: {unknown or 'none given'}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be >= 1")
    trainer = load_trainer(args.run)
    results = {"machine": common.machine_info(), "run": args.run.name, "steps": args.steps,
               "labeled_cases": len(trainer.data.splits["labeled"]), "variants": {}}
    for variant in variants:
        results["variants"][variant] = train_variant(trainer, variant, args.run / "teacher_mim.keras",
                                                     args.steps, args.eval_every)
    rows = [{"variant": v, **{k: r[k] for k in ("trained_parameters", "best_val_dice", "best_step",
                                                "pseudo_dice_at_best")}}
            for v, r in results["variants"].items()]
    common.print_table(rows, ["variant", "trained_parameters", "best_val_dice", "best_step", "pseudo_dice_at_best"])
    if args.out:
        common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
