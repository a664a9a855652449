"""Write the index file of a sweep: one line per (method, labeled fraction, seed) run.

Line i (a tab-separated `index method labeled_fraction seed preset`) is run by array task i of
slurm/sweep.sbatch; the submit command is printed on stderr:

    python slurm/sweep_index.py --methods supervised mean_teacher --fractions 0.1 0.2 \
        --seeds 0 1 2 --presets mean_teacher=pancreas_mean_teacher > sweep.tsv
    sbatch --array=0-11 slurm/sweep.sbatch sweep.tsv
"""
import argparse
import itertools
import sys

COLUMNS = ("index", "method", "labeled_fraction", "seed", "preset")


def sweep_rows(methods, fractions, seeds, presets=None):
    """All runs, method-major: [(index, method, fraction, seed, preset or '-')]."""
    presets = presets or {}
    unknown = sorted(set(presets) - set(methods))
    if unknown:
        raise ValueError(f"--presets names methods not in --methods: {', '.join(unknown)}")
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--fractions: {fraction} is not in (0, 1]")
    runs = itertools.product(methods, fractions, seeds)
    return [(index, method, f"{fraction:g}", str(seed), presets.get(method, "-"))
            for index, (method, fraction, seed) in enumerate(runs)]


def parse_presets(pairs):
    presets = {}
    for pair in pairs:
        method, sep, preset = pair.partition("=")
        if not sep or not method or not preset:
            raise ValueError(f"--presets: expected METHOD=PRESET, got {pair!r}")
        presets[method] = preset
    return presets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--fractions", nargs="+", type=float, required=True,
                        help="labeled fractions, e.g. 0.1 0.2 0.5")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--presets", nargs="*", default=[],
                        help="METHOD=PRESET pairs; other methods use $PRESET of the job")
    parser.add_argument("--header", action="store_true", help="start with a '#' header line")
    args = parser.parse_args(argv)
    try:
        rows = sweep_rows(args.methods, args.fractions, args.seeds, parse_presets(args.presets))
    except ValueError as err:
        parser.error(str(err))
    if args.header:
        print("#" + "\t".join(COLUMNS))
    for row in rows:
        print("\t".join(str(value) for value in row))
    print(f"{len(rows)} runs: sbatch --array=0-{len(rows) - 1} slurm/sweep.sbatch SWEEP_FILE",
          file=sys.stderr)


if __name__ == "__main__":
    main()
