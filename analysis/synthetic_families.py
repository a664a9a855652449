"""Figure of the embedded 2D data set's appearance families: for every family value and artefact
(titled with its share at difficulty 1 / at the default difficulty), the cleanest case that has it
(fewest other rare traits; RGB with the mask border in green), and in grey as a model sees it.

    python analysis/synthetic_families.py --out docs/figures/synthetic_families.png

Generates the cases it needs into a temporary folder (NumPy/SciPy only, no TensorFlow).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/synthetic_families.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from semiseg.data import synthetic as synthetic_data  # noqa: E402


def _other_traits(case, shown):
    """How many rare values and artefacts a case has besides ``shown``: fewer = a cleaner example."""
    rare = [case[factor] for factor, values in synthetic_data.FAMILY_SHARES.items()
            if case[factor] != next(iter(values))]
    return len([trait for trait in rare + case["artefacts"] if trait != shown])


def _shares(factor, value):
    """'share at difficulty 1 / at the default difficulty', e.g. '10% / 15%'."""
    default_shares, default_rates = synthetic_data.family_shares(synthetic_data.DEFAULT_DIFFICULTY)
    if factor == "artefacts":
        return f"{synthetic_data.ARTEFACT_RATES[value]:.0%} / {default_rates[value]:.0%}"
    return f"{synthetic_data.FAMILY_SHARES[factor][value]:.0%} / {default_shares[factor][value]:.0%}"


def family_rows(index, per_value=1):
    """[(title, [case names])]: per factor value and per artefact, in the generator's order, the
    ``per_value`` cleanest cases that have it (fewest other rare traits, then lowest index)."""
    cases = sorted(index["cases"].items())

    def pick(value, has):
        found = [(name, case) for name, case in cases if has(case)]
        return [name for name, case in sorted(found, key=lambda item: _other_traits(item[1], value))][:per_value]

    rows = []
    for factor, values in synthetic_data.FAMILY_SHARES.items():
        for value in values:
            names = pick(value, lambda case: case[factor] == value)
            rows.append((f"{factor}: {value} {_shares(factor, value)}", names))
    for artefact in synthetic_data.ARTEFACT_RATES:
        names = pick(artefact, lambda case: artefact in case["artefacts"])
        rows.append((f"{artefact} {_shares('artefacts', artefact)}", names))
    return rows


def outlined(image, mask):
    """RGB image with the mask's one-pixel border in green."""
    border = mask & ~ndimage.binary_erosion(mask)
    out = image.copy()
    out[border] = (40, 230, 60)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures/synthetic_families.png")
    parser.add_argument("--n", type=int, default=200, help="cases generated to pick examples from")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=float, default=1.0,
                        help="of the cases shown (1: fewer rare traits per case, cleaner examples)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_data.generate_2d(Path(tmp), n_cases=args.n, size=args.size, seed=args.seed, channels=3,
                                            difficulty=args.difficulty)
        index = json.loads((root / synthetic_data.INDEX_FILE).read_text())
        entries = family_rows(index)
        per_row = 4  # entries per figure row; each entry is RGB with the mask border, then grey
        n_rows = -(-len(entries) // per_row)
        fig, axes = plt.subplots(n_rows, 2 * per_row, figsize=(2 * per_row * 0.9, n_rows * 1.05))
        for ax in axes.flat:
            ax.axis("off")
        for position, (title, names) in enumerate(entries):
            row, column = divmod(position, per_row)
            for name in names[:1]:
                image = np.array(Image.open(root / "images" / f"{name}.png"))
                mask = np.array(Image.open(root / "masks" / f"{name}_segmentation.png")) > 0
                grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
                axes[row, 2 * column].imshow(outlined(image, mask))
                axes[row, 2 * column + 1].imshow(grey, cmap="gray", vmin=0, vmax=255)
                axes[row, 2 * column].set_title(title, fontsize=6.5, loc="left")
        fig.tight_layout(pad=0.2, h_pad=0.4, w_pad=0.05)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=80)
        plt.close(fig)
        # A 256-colour palette keeps the committed PNG small (the photos are smooth).
        Image.open(args.out).convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
