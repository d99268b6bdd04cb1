"""More seeds of the published record-level arms on the TEST set: density 0.1, epsilon 8 and no DP.

``python -m simulations.dp_record_seeds --out FILE [--seeds 1,2] [--jobs 2]``: the bench's
own arms (`simulations.bench_privacy_dp.dp_rows`, the picked ``RECORD_TUNED`` settings) at
other seeds, so the epsilon-8 gap to the non-private arm can be told from seed noise. Only the
picked setting runs here; nothing is tuned on these figures.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from simulations.bench_privacy_dp import dp_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",") if s):
        rows += dp_rows(
            seed, epsilons=(8.0, math.inf), densities=(0.1,), jobs=args.jobs, kinds=("record",)
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")  # kept as each seed ends
    for r in rows:
        eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:g}"
        print(f"seed {r['seed']} eps={eps:4s} test_acc={r['final_accuracy']:.4f}")


if __name__ == "__main__":
    main()
