"""Compress a trained run: `python -m moejax.compress --workdir W --method wanda --sparsity 0.5
[--pattern 2:4] [--refine dsnot] [--calib_batches 8] [--calib_offset 0] --out OUT`.

Prunes the feed-forward weights (MLPs, routed and shared experts) of W's newest usable
checkpoint in one shot from calibration batches of W's own training data (the
`--calib_batches` after the first `--calib_offset` of its training stream)
(`moejax.training.calibrated_pruning`: magnitude, Wanda or SparseGPT, block after block, each
expert on its own tokens; `--refine dsnot` refines every mask by DSnoT's swaps before the method
rebuilds the weights), and writes OUT as a workdir holding the pruned model at the same
step with W's config: `eval.py --workdir OUT` evaluates it, and `train.py --workdir OUT`
continues training it (as a dense run: the zeros are not held by masks). W is only read.
Bad arguments are one-line errors (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moejax import cli
from moejax.config import ConfigError
from moejax.training.calibrated_pruning import METHODS, REFINEMENTS


def _pattern(text: str) -> tuple[int, int] | None:
    if text in ("", "unstructured"):
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--pattern: {text!r}; allowed: n:m (as 2:4) or unstructured") from None
    if not 0 < n <= m:
        raise ConfigError(f"--pattern: {text!r}; allowed: n:m with 0 < n <= m")
    return n, m


def main(argv: list[str]) -> int:
    return cli.report_user_errors(lambda: _main(argv), argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the trained run (read only)")
    parser.add_argument("--out", required=True, help="the new workdir for the pruned model")
    parser.add_argument("--method", default="wanda", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of weights removed")
    parser.add_argument("--pattern", default="unstructured", help="unstructured or n:m (2:4)")
    parser.add_argument("--refine", default="none", help=f"none or {', '.join(REFINEMENTS)}")
    parser.add_argument("--calib_batches", type=int, default=8, help="training batches to use")
    parser.add_argument("--calib_offset", type=int, default=0, help="training batches skipped")
    args = parser.parse_args(argv)
    if args.method not in METHODS:
        raise ConfigError(f"--method: {args.method!r}; allowed: {', '.join(METHODS)}")
    if args.refine not in ("none", *REFINEMENTS):
        raise ConfigError(f"--refine: {args.refine!r}; allowed: none, {', '.join(REFINEMENTS)}")
    refine = None if args.refine == "none" else args.refine
    if not 0.0 <= args.sparsity < 1.0:
        raise ConfigError(f"--sparsity: {args.sparsity}; allowed: a share in [0, 1)")
    if args.calib_batches < 1:
        raise ConfigError(f"--calib_batches: {args.calib_batches}; allowed: >= 1")
    if args.calib_offset < 0:
        raise ConfigError(f"--calib_offset: {args.calib_offset}; allowed: >= 0")
    nm = _pattern(args.pattern)
    workdir, out = Path(args.workdir).absolute(), Path(args.out).absolute()
    if out == workdir:
        raise ConfigError("--out: the same directory as --workdir; W is never modified")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} exists and is not empty; give a new directory")
    cli.setup_logging()
    summary, report = _compress(
        workdir, out, args.method, args.sparsity, nm, args.calib_batches, refine, args.calib_offset
    )
    print(summary)
    for block, entry in report.items():
        print(f"  {block}: {entry}")
    return 0


def _compress(
    workdir: Path,
    out: Path,
    method: str,
    sparsity: float,
    nm,
    calib_batches: int,
    refine: str | None = None,
    calib_offset: int = 0,
) -> tuple[str, dict]:
    """Prunes `workdir`'s newest checkpoint into the new workdir `out`: (a one-line summary,
    the per-block report of `prune_feed_forwards`)."""
    import jax
    import numpy as np
    from flax import nnx

    from moejax import config as config_lib
    from moejax.parallel import sharding
    from moejax.training import corpus
    from moejax.training import state as state_lib
    from moejax.training import workdir as workdir_lib
    from moejax.training.calibrated_pruning import prune_feed_forwards
    from moejax.training.checkpoint import Checkpointer
    from moejax.training.restore import read_run, restore_checkpoint

    config = read_run(workdir)
    devices = jax.devices()[:1]
    mesh = sharding.make_mesh(config_lib.validate(config, len(devices)), devices)
    layout = state_lib.state_layout(config, mesh)
    restored = restore_checkpoint(workdir, config, layout.restore_target())
    model = layout.spec.merge(state_lib.model_variables(restored.state))
    iterator = corpus.train_iterator(config.data, block=None)
    for _ in range(calib_offset):
        next(iterator)
    calibration = [np.asarray(next(iterator)["inputs"]) for _ in range(calib_batches)]
    iterator.close()
    start = time.perf_counter()
    report = prune_feed_forwards(
        model, calibration, method=method, sparsity=sparsity, nm=nm, refine=refine
    )
    seconds = time.perf_counter() - start
    params = jax.device_put(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), layout.shardings["params"]
    )
    state = {**restored.state, "params": params}
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(
        out / workdir_lib.CHECKPOINT_DIR, keep=config.train.keep_checkpoints, async_save=False
    )
    checkpointer.save(restored.step, state, restored.data_state)
    checkpointer.wait()
    checkpointer.close()
    workdir_lib.write_config(out, config)
    pattern = "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"
    summary = (
        f"pruned the feed-forwards of {workdir} step {restored.step} by {method}"
        f"{'' if refine is None else ' + ' + refine}, "
        f"{100 * sparsity:.0f}% {pattern}, from {calib_batches} calibration batches (after "
        f"{calib_offset}) in "
        f"{seconds:.1f} s; wrote {out}"
    )
    return summary, report


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
