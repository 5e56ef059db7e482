"""Markdown rows of bench/results/minilm_pruning.md from the folders `sparse-engine prune --hf` wrote.

    python bench/minilm_pruning.py OUT_DIR [OUT_DIR ...]

Each OUT_DIR's prune.report.json gives one row: method, granularity, measured sparsity, distillation
(steps and seconds, or none), validation cosine to dense (mean, min), nearest-neighbour agreement,
the one-shot cosine before distillation, the threads used and the whole run's seconds (loading,
calibration, pruning, distillation, validation; reports written before it was recorded show "-").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = ("| method | granularity | sparsity | distillation | cosine mean | cosine min | NN agreement | "
          "one-shot cosine | threads | total s |\n|---|---|---|---|---|---|---|---|---|---|")


def row(folder: Path) -> str:
    r = json.loads((folder / "prune.report.json").read_text())
    first, final = r["steps"][0], r["final"]
    distilled = (f"{final['step']} steps, {final['seconds']:.0f} s"
                 if final["step"] else "none (one-shot)")
    total = f"{r['seconds_total']:.0f}" if "seconds_total" in r else "-"
    return (f"| {r['method']} | {r['granularity']} | {r['measured_sparsity']:.3f} | {distilled} | "
            f"{final['cosine_mean']:.4f} | {final['cosine_min']:.4f} | {final['nn_agreement']:.3f} | "
            f"{first['cosine_mean']:.4f} | {r['threads']} | {total} |")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(HEADER)
    for folder in argv:
        print(row(Path(folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
