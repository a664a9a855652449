"""Does mixed_bfloat16 keep test Dice within 1 point of float32? (issue 9, item 0)

    python bench/precision_dice.py [--out runs/bench_label_efficiency] [--seeds 3]

Trains the supervised U-Net with all labels on the embedded data at the label-efficiency
benchmark's settings (48x48, 400 steps; bench/label_efficiency.py), once per seed in float32 and
once in mixed_bfloat16, and compares test Dice per seed. With the label-efficiency benchmark's
--out, its float32 runs (supervised-100pct-seedN) are reused. Writes precision_dice.json and prints
the verdict. A CPU without AVX512_BF16 emulates bfloat16 (slow: see machine_limit.py), but the
numbers it computes are bfloat16's all the same, so the Dice comparison holds there too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common  # noqa: E402
import label_efficiency as le  # noqa: E402

GOAL_POINTS = 1.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_label_efficiency")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in range(args.seeds):
        dice = {}
        for policy, suffix in (("float32", ""), ("mixed_bfloat16", "-mixed_bfloat16")):
            run = le.run_one(out, "supervised", 1.0, seed, le.BENCH + [f"train.precision={policy}"], suffix)
            dice[policy] = json.loads((run / "metrics.json").read_text())["dice"]
        rows.append({"seed": seed, "float32": round(dice["float32"], 4), "mixed_bfloat16": round(dice["mixed_bfloat16"], 4),
                     "points": round(100 * (dice["mixed_bfloat16"] - dice["float32"]), 2)})
    mean = sum(r["points"] for r in rows) / len(rows)
    result = {"machine": common.machine_info(), "rows": rows, "mean_points": round(mean, 2),
              "goal_within_points": GOAL_POINTS, "goal_met": abs(mean) <= GOAL_POINTS}
    common.print_table(rows, ["seed", "float32", "mixed_bfloat16", "points"])
    print(f"mixed_bfloat16 - float32: {mean:+.2f} Dice points on average "
          f"({'within' if result['goal_met'] else 'NOT within'} {GOAL_POINTS:g})")
    common.write_json(out / "precision_dice.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
