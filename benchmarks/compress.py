"""One-shot pruning of a trained LM's feed-forwards: validation bits/byte per method, pattern and
refinement, over several draws of calibration data.

    python benchmarks/compress.py --workdir W [--calib_batches 8] [--sparsity 0.5] [--draws 3]

For magnitude, Wanda and SparseGPT, each without and with DSnoT, at `--sparsity` unstructured
and at 2:4, prunes W's newest checkpoint with `python -m moejax.compress`'s code into a
temporary workdir and evaluates it as `eval.py` does (the run's validation batches), next to
the dense model, all in one run. Draw d calibrates on the training batches d * calib_batches ..
(d + 1) * calib_batches - 1. Prints the table (mean ± sample std over the draws) and the mean
pruning time of each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from moejax import stats
from moejax.compress import _compress
from moejax.evaluation import evaluate_workdir

PATTERNS = {"unstructured": None, "2:4": (2, 4)}
METHODS = ("magnitude", "wanda", "sparsegpt")
REFINEMENTS = (None, "dsnot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--calib_batches", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(args.workdir).absolute()
    dense = evaluate_workdir(workdir)["bits_per_byte"]
    print(f"dense model of {workdir}: {dense:.4f} bits/byte")
    print("| method | pattern | bits/byte | vs dense | prune time |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, nm in PATTERNS.items():
            for method in METHODS:
                for refine in REFINEMENTS:
                    bits, seconds = [], []
                    for draw in range(args.draws):
                        out = Path(tmp) / f"{method}-{name.replace(':', '_')}-{refine}-{draw}"
                        start = time.perf_counter()
                        _compress(
                            workdir,
                            out,
                            method,
                            args.sparsity,
                            nm,
                            args.calib_batches,
                            refine,
                            draw * args.calib_batches,
                        )
                        seconds.append(time.perf_counter() - start)
                        bits.append(evaluate_workdir(out)["bits_per_byte"])
                    label = f"{100 * args.sparsity:.0f}% {name}" if nm is None else name
                    shown = method if refine is None else f"{method} + {refine}"
                    relative = 100 * (np.asarray(bits) / dense - 1)
                    print(
                        f"| {shown} | {label} | {stats.mean_and_spread(bits, 4)} "
                        f"| {stats.mean_and_spread(relative, 1)}% | {np.mean(seconds):.1f} s |"
                    )


if __name__ == "__main__":
    main()
