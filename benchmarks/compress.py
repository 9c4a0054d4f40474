"""One-shot pruning of a trained LM's feed-forwards: validation bits/byte per method and pattern.

    python benchmarks/compress.py --workdir W [--calib_batches 8] [--sparsity 0.5]

For magnitude, Wanda and SparseGPT at `--sparsity` unstructured and at 2:4, prunes W's newest
checkpoint with `python -m moejax.compress`'s code (calibration batches from W's training data)
into a temporary workdir and evaluates it as `eval.py` does (the run's validation batches),
next to the dense model, all in one run. Prints the table and the pruning time of each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from moejax.compress import _compress
from moejax.evaluation import evaluate_workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--calib_batches", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    dense = evaluate_workdir(args.workdir)["bits_per_byte"]
    print(f"dense model of {args.workdir}: {dense:.4f} bits/byte")
    print("| method | pattern | bits/byte | vs dense | prune time |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in (None, (2, 4)):
            for method in ("magnitude", "wanda", "sparsegpt"):
                name = "unstructured" if pattern is None else "2:4"
                out = Path(tmp) / f"{method}-{name.replace(':', '_')}"
                start = time.perf_counter()
                _compress(
                    Path(args.workdir).absolute(),
                    out,
                    method,
                    args.sparsity,
                    pattern,
                    args.calib_batches,
                )
                seconds = time.perf_counter() - start
                bits = evaluate_workdir(out)["bits_per_byte"]
                label = f"{100 * args.sparsity:.0f}% {name}" if pattern is None else name
                print(
                    f"| {method} | {label} | {bits:.4f} | {100 * (bits / dense - 1):+.1f}% "
                    f"| {seconds:.1f} s |"
                )


if __name__ == "__main__":
    main()
