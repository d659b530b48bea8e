"""Copy the README's figures from the executed notebooks into docs/figures/, small.

Run by ``make figures`` after notebooks 01, 02 and 03 have run with their defaults (``make main``,
``make notebooks``). Each PNG is scaled from the notebooks' 110 dpi to 90 dpi and reduced to a
256-colour palette, so that it stays under 150 KB; a figure still larger is an error.

    python scripts/figures.py [--outputs outputs] [--dest docs/figures]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# (notebook output folder, figure file, name in docs/figures)
FIGURES = [
    ("01_ppl_p_sparsity", "fig3_pareto.png", "fig3_pareto.png"),
    ("01_ppl_p_sparsity", "cett_vs_threshold.png", "cett_vs_threshold.png"),
    ("01_ppl_p_sparsity", "layer_profile.png", "layer_profile.png"),
    ("02_activation_vs_data", "fig4_activation_vs_data.png", "fig4_activation_vs_data.png"),
    ("02_activation_vs_data", "mse_profiles_A0.png", "mse_profiles_A0.png"),
    ("03_training_runs", "fig2_moe_pareto.png", "fig2_moe_pareto.png"),
]
SOURCE_DPI, TARGET_DPI, MAX_BYTES = 110, 90, 150_000


def shrink(src: Path, dest: Path) -> int:
    """Write ``src`` scaled to TARGET_DPI as a palette PNG at ``dest`` (atomically); return its size."""
    with Image.open(src) as img:
        rgb = img.convert("RGB")  # matplotlib's white background: the alpha channel carries nothing
    scale = TARGET_DPI / SOURCE_DPI
    small = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.LANCZOS)
    small = small.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        small.save(tmp, format="PNG", optimize=True, dpi=(TARGET_DPI, TARGET_DPI))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="the notebooks' output folders")
    parser.add_argument("--dest", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args(argv)
    missing = [args.outputs / folder / name for folder, name, _ in FIGURES if not (args.outputs / folder / name).is_file()]
    if missing:
        print("missing figures (run the notebooks first: make main notebooks):\n  "
              + "\n  ".join(str(m) for m in missing), file=sys.stderr)
        return 1
    args.dest.mkdir(parents=True, exist_ok=True)
    too_big = []
    for folder, name, out_name in FIGURES:
        size = shrink(args.outputs / folder / name, args.dest / out_name)
        print(f"{args.dest / out_name}: {size / 1000:.0f} KB")
        if size > MAX_BYTES:
            too_big.append(out_name)
    if too_big:
        print(f"over {MAX_BYTES // 1000} KB: {', '.join(too_big)} (lower TARGET_DPI or simplify the figure)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
