"""Figure of the embedded 2D data set's appearance families: for every family value and artefact,
the first cases that have it (RGB, the mask border drawn in green), and in grey as a model sees it.

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

import synthetic_data  # noqa: E402


def family_rows(index, per_value=2):
    """[(row title, [case names])]: per factor value (rare values after the common one) and per
    artefact, the first ``per_value`` cases that have it."""
    cases = index["cases"]
    rows = []
    for factor, shares in index["shares"].items():
        for value in shares:
            names = [name for name, case in sorted(cases.items()) if case[factor] == value][:per_value]
            rows.append((f"{factor}: {value} ({shares[value]:.0%})", names))
    for artefact, rate in index["artefact_rates"].items():
        names = [name for name, case in sorted(cases.items()) if artefact in case["artefacts"]][:per_value]
        rows.append((f"{artefact} ({rate:.0%})", names))
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
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_data.generate_2d(Path(tmp), n_cases=args.n, size=args.size, seed=args.seed, channels=3)
        index = json.loads((root / synthetic_data.INDEX_FILE).read_text())
        rows = family_rows(index)
        columns = 4  # two cases, each in RGB with its mask border and in grey
        fig, axes = plt.subplots(len(rows) // 2 + len(rows) % 2, 2 * columns, figsize=(2 * columns * 1.05, 0.55 * len(rows) * 1.1))
        for ax in axes.flat:
            ax.axis("off")
        for row_index, (title, names) in enumerate(rows):
            row, half = divmod(row_index, 2)
            for slot, name in enumerate(names):
                image = np.array(Image.open(root / "images" / f"{name}.png"))
                mask = np.array(Image.open(root / "masks" / f"{name}_segmentation.png")) > 0
                grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
                left = axes[row, half * columns + 2 * slot]
                left.imshow(outlined(image, mask))
                axes[row, half * columns + 2 * slot + 1].imshow(grey, cmap="gray", vmin=0, vmax=255)
                if slot == 0:
                    left.set_title(title, fontsize=7, loc="left")
        fig.tight_layout(pad=0.2, h_pad=0.6, w_pad=0.1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=55)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
