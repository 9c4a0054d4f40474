"""Compress a trained run: `python -m moejax.compress --workdir W --method M [options] --out OUT`.

`--hf DIR --text FILE` instead of `--workdir W` compresses a Hugging Face checkpoint, calibrated
on the text, into OUT as a checkpoint directory (`eval.py --hf OUT --text FILE` scores it).

Compresses W's newest usable checkpoint after training, on W's own mesh over every device (the
experts stay sharded over `expert`), from calibration batches of W's own
training data (the `--calib_batches` after the first `--calib_offset` of its training stream),
and writes OUT as a workdir holding the compressed model with W's config (or the new one, when
the method changes the architecture): `eval.py --workdir OUT` evaluates it and
`train.py --workdir OUT` fine-tunes it. W is only read. The methods, by family (`FAMILIES`):

- one-shot pruning of the MLPs and experts (`moejax.training.calibrated_pruning`): magnitude,
  wanda, sparsegpt, armor; `--sparsity`, `--pattern unstructured|n:m`, `--refine dsnot`;
- expert-level compression (`moejax.training.expert_compression`): frequency, importance,
  mc_smoe keep `--keep_experts` of every MoE layer's experts; readme turns every dense MLP
  into `--experts` experts routed `--top_k` at a time by a token-id router;
- weight quantisation (`moejax.training.calibrated_quantization`): rtn, gptq, eaquant, gqsa at
  `--bits` per `--group_size` inputs, `--mixed` for more bits on shared experts and routers,
  `--group_sparsity` for the share of groups GQSA removes.

A compressed model of the same architecture keeps W's step, optimizer and data state (the zeros
and the rounded values are not held by masks: fine-tuning moves them); one of a new
architecture starts a fresh optimizer at W's step. Bad arguments are one-line errors (exit
status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moejax import cli
from moejax.config import ConfigError
from moejax.training.calibrated_pruning import METHODS as PRUNING_METHODS
from moejax.training.calibrated_pruning import REFINEMENTS
from moejax.training.calibrated_quantization import QUANT_METHODS
from moejax.training.expert_compression import EXPERT_METHODS


@dataclasses.dataclass(frozen=True)
class Request:
    """One compression: the method and the options its family reads (the others are unused)."""

    method: str = "wanda"
    calib_batches: int = 8
    calib_offset: int = 0
    # One-shot pruning.
    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    refine: str | None = None
    # Expert-level compression; Read-ME's MoE-fication.
    keep_experts: int = 0
    experts: int = 0
    top_k: int = 1
    # Quantisation (`group_sparsity`: the share of weight groups GQSA removes).
    bits: int = 4
    group_size: int = 32
    mixed: bool = False
    group_sparsity: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            ("--method", self.method in FAMILY_OF, self.method, ", ".join(FAMILY_OF)),
            ("--calib_batches", self.calib_batches >= 1, self.calib_batches, ">= 1"),
            ("--calib_offset", self.calib_offset >= 0, self.calib_offset, ">= 0"),
            ("--sparsity", 0.0 <= self.sparsity < 1.0, self.sparsity, "a share in [0, 1)"),
            (
                "--refine",
                self.refine is None or self.refine in REFINEMENTS,
                self.refine,
                f"none, {', '.join(REFINEMENTS)}",
            ),
            ("--bits", 2 <= self.bits <= 8, self.bits, "an int in [2, 8]"),
            ("--group_size", self.group_size >= 1, self.group_size, ">= 1"),
            (
                "--group_sparsity",
                0.0 <= self.group_sparsity < 1.0,
                self.group_sparsity,
                "a share in [0, 1)",
            ),
        )
        for flag, ok, value, allowed in checks:
            if not ok:
                raise ConfigError(f"{flag}: {value!r}; allowed: {allowed}")
        self.family.check(self)

    @property
    def family(self) -> Family:
        return FAMILIES[FAMILY_OF[self.method]]

    def describe(self) -> str:
        """The method and the options it used, as the summary line shows them."""
        return self.family.describe(self)


@dataclasses.dataclass(frozen=True)
class Compressed:
    """A family's result: its report and, when the architecture changed, the new model config
    with the new model's parameters and router state (pure dicts)."""

    report: dict[str, Any]
    model_config: Any = None
    params: dict[str, Any] | None = None
    router_state: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of compression methods as the command runs it.

    methods: its method names. run: `(model, model_config, calibration, request) ->
    Compressed`. describe: the summary's words for a request. check: raises `ConfigError` for
    options the family cannot take. under_mesh: runs under the run's mesh (a family that
    builds modules of a new architecture cannot: moejax never builds them under an ambient
    mesh, `sharding.param`). hf_form: its result can be written as a Hugging Face checkpoint.
    """

    methods: tuple[str, ...]
    run: Callable[..., Compressed]
    describe: Callable[[Request], str]
    check: Callable[[Request], None] = lambda request: None
    under_mesh: bool = True
    hf_form: bool = True


def _bar(action: str) -> Callable:
    """A per-block progress bar on stderr (tqdm, as train.py's), for a driver's `progress`."""
    from tqdm import tqdm

    return lambda blocks: tqdm(blocks, desc=action, unit="block", leave=False)


def _prune(model: Any, model_config: Any, calibration: list, request: Request) -> Compressed:
    from moejax.training.calibrated_pruning import prune_feed_forwards

    report = prune_feed_forwards(
        model,
        calibration,
        method=request.method,
        sparsity=request.sparsity,
        nm=request.nm,
        refine=request.refine,
        progress=_bar("pruning"),
    )
    return Compressed(report)


def _new_architecture(result: Any) -> Compressed:
    return Compressed(result.report, result.config, result.params, result.router_state)


def _experts(model: Any, model_config: Any, calibration: list, request: Request) -> Compressed:
    from moejax.training.expert_compression import compress_experts

    return _new_architecture(
        compress_experts(
            model,
            model_config,
            calibration,
            method=request.method,
            keep=request.keep_experts,
            progress=_bar(request.method),
        )
    )


def _moefy(model: Any, model_config: Any, calibration: list, request: Request) -> Compressed:
    from moejax.training.expert_compression import moefy_model

    return _new_architecture(
        moefy_model(
            model,
            model_config,
            calibration,
            num_experts=request.experts,
            top_k=request.top_k,
            progress=_bar("MoE-fying"),
        )
    )


def _quantize(model: Any, model_config: Any, calibration: list, request: Request) -> Compressed:
    from moejax.training.calibrated_quantization import quantize_feed_forwards

    report = quantize_feed_forwards(
        model,
        calibration,
        method=request.method,
        bits=request.bits,
        group_size=request.group_size,
        mixed=request.mixed,
        sparsity=request.group_sparsity,
        progress=_bar("quantising"),
    )
    return Compressed(report)


def _pattern_name(nm: tuple[int, int] | None) -> str:
    return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"


def _check_keep(request: Request) -> None:
    if request.keep_experts < 1:
        raise ConfigError(f"--keep_experts: {request.keep_experts}; allowed: >= 1")


def _check_moefy(request: Request) -> None:
    if not 1 <= request.top_k <= request.experts:
        raise ConfigError(
            f"--experts {request.experts} --top_k {request.top_k}; allowed: 1 <= top_k <= experts"
        )


FAMILIES: dict[str, Family] = {
    "prune": Family(
        PRUNING_METHODS,
        _prune,
        lambda r: (
            f"{r.method}{'' if r.refine is None else ' + ' + r.refine}, "
            f"{100 * r.sparsity:.0f}% {_pattern_name(r.nm)}"
        ),
    ),
    "experts": Family(
        tuple(EXPERT_METHODS),
        _experts,
        lambda r: f"{r.method}, {r.keep_experts} experts kept",
        check=_check_keep,
        under_mesh=False,
    ),
    # Read-ME's token-id router has no Hugging Face form.
    "moefy": Family(
        ("readme",),
        _moefy,
        lambda r: f"{r.method}, {r.experts} experts, top {r.top_k}",
        check=_check_moefy,
        under_mesh=False,
        hf_form=False,
    ),
    "quantize": Family(
        QUANT_METHODS,
        _quantize,
        lambda r: (
            f"{r.method}, {r.bits} bits per {r.group_size}{', mixed' if r.mixed else ''}"
            + (f", {100 * r.group_sparsity:.0f}% of groups removed" if r.group_sparsity else "")
        ),
    ),
}
FAMILY_OF = {method: name for name, family in FAMILIES.items() for method in family.methods}


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
    parser.add_argument("--workdir", help="the trained run (read only)")
    parser.add_argument("--hf", help="instead of --workdir: a Hugging Face checkpoint (read only)")
    parser.add_argument("--text", help="with --hf: the calibration text (UTF-8 file)")
    parser.add_argument("--out", required=True, help="the new workdir for the compressed model")
    parser.add_argument("--method", default="wanda", help=f"one of {', '.join(FAMILY_OF)}")
    parser.add_argument("--calib_batches", type=int, default=8, help="training batches to use")
    parser.add_argument("--calib_offset", type=int, default=0, help="training batches skipped")
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of weights removed")
    parser.add_argument("--pattern", default="unstructured", help="unstructured or n:m (2:4)")
    parser.add_argument("--refine", default="none", help=f"none or {', '.join(REFINEMENTS)}")
    parser.add_argument("--keep_experts", type=int, default=0, help="experts kept per layer")
    parser.add_argument("--experts", type=int, default=0, help="readme: experts per MLP")
    parser.add_argument("--top_k", type=int, default=1, help="readme: experts per token")
    parser.add_argument("--bits", type=int, default=4, help="quantisation: bits per weight")
    parser.add_argument("--group_size", type=int, default=32, help="inputs per scale")
    parser.add_argument("--mixed", action="store_true", help="8 bits for shared experts, router")
    parser.add_argument("--group_sparsity", type=float, default=0.0, help="gqsa: groups removed")
    args = parser.parse_args(argv)
    request = Request(
        method=args.method,
        calib_batches=args.calib_batches,
        calib_offset=args.calib_offset,
        sparsity=args.sparsity,
        nm=_pattern(args.pattern),
        refine=None if args.refine == "none" else args.refine,
        keep_experts=args.keep_experts,
        experts=args.experts,
        top_k=args.top_k,
        bits=args.bits,
        group_size=args.group_size,
        mixed=args.mixed,
        group_sparsity=args.group_sparsity,
    )
    if (args.workdir is None) == (args.hf is None):
        raise ConfigError("--workdir / --hf: give exactly one (a trained run or a checkpoint)")
    if (args.hf is None) != (args.text is None):
        raise ConfigError("--hf and --text go together: give both")
    source, out = Path(args.workdir or args.hf).absolute(), Path(args.out).absolute()
    if out == source:
        raise ConfigError("--out: the same directory as the input; it is never modified")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {out} exists and is not empty; give a new directory")
    if args.text is not None and not Path(args.text).is_file():
        raise ConfigError(f"--text: {args.text!r} is not a file")
    cli.setup_logging()
    try:
        if args.hf is None:
            summary, report = compress(source, out, request)
        else:
            summary, report = compress_hf(source, Path(args.text), out, request)
    except ValueError as error:
        # The drivers check what only the model can tell (`require`: field, value, allowed):
        # a bad argument all the same, so one line and exit 2, not a traceback.
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(str(error)) from error
    print(summary)
    for block, entry in report.items():
        print(f"  {block}: {_compact(entry)}")
    return 0


def _compact(value: Any, width: int = 8) -> Any:
    """`value` with every list longer than `width` cut to its first `width` items and a count
    (Read-ME's neuron partitions would fill the screen)."""
    if isinstance(value, dict):
        return {key: _compact(item, width) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_compact(item, width) for item in value[:width]]
        return items + [f"... {len(value)} in all"] if len(value) > width else items
    return value


def compress(workdir: Path, out: Path, request: Request) -> tuple[str, dict]:
    """Compresses `workdir`'s newest checkpoint into the new workdir `out` as `request` asks:
    (a one-line summary, the family's per-block report)."""
    import jax
    import numpy as np
    from flax import nnx

    from moejax import config as config_lib
    from moejax.parallel import sharding
    from moejax.training import corpus
    from moejax.training import state as state_lib
    from moejax.training import workdir as workdir_lib
    from moejax.training.checkpoint import Checkpointer
    from moejax.training.restore import read_run, restore_checkpoint

    config = read_run(workdir)
    # The run's own mesh over every device, as eval.py restores it: the experts stay sharded
    # over `expert` while their statistics accumulate and each is pruned.
    devices = jax.devices()
    mesh = sharding.make_mesh(config_lib.validate(config, len(devices)), devices)
    layout = state_lib.state_layout(config, mesh)
    restored = restore_checkpoint(workdir, config, layout.restore_target())
    model = layout.spec.merge(state_lib.model_variables(restored.state))
    iterator = corpus.train_iterator(config.data, block=None)
    for _ in range(request.calib_offset):
        next(iterator)
    calibration = [np.asarray(next(iterator)["inputs"]) for _ in range(request.calib_batches)]
    iterator.close()
    start = time.perf_counter()
    family = request.family
    # Under the run's mesh: an expert-parallel dispatch reads it while routing calibration.
    with jax.set_mesh(mesh) if family.under_mesh else contextlib.nullcontext():
        result = family.run(model, config.model, calibration, request)
    seconds = time.perf_counter() - start
    if result.model_config is None:
        params = jax.device_put(
            nnx.to_pure_dict(nnx.state(model, nnx.Param)), layout.shardings["params"]
        )
        state = {**restored.state, "params": params}
    else:
        config = dataclasses.replace(config, model=result.model_config)
        layout = state_lib.state_layout(config, mesh)
        values = {"params": result.params, "router_state": result.router_state or {}}
        state = state_lib.init_state(config, layout, values)
        state = {**state, "step": jax.numpy.asarray(restored.step, state["step"].dtype)}
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(
        out / workdir_lib.CHECKPOINT_DIR, keep=config.train.keep_checkpoints, async_save=False
    )
    checkpointer.save(restored.step, state, restored.data_state)
    checkpointer.wait()
    checkpointer.close()
    workdir_lib.write_config(out, config)
    summary = (
        f"compressed {workdir} step {restored.step} by {request.describe()}, from "
        f"{request.calib_batches} calibration batches (after {request.calib_offset}) in "
        f"{seconds:.1f} s; wrote {out}"
    )
    return summary, result.report


# Calibration windows cut from --text for a Hugging Face checkpoint: rows of this many tokens
# (or the model's context, if shorter), this many rows per batch.
HF_CALIBRATION_LENGTH, HF_CALIBRATION_ROWS = 128, 4


def compress_hf(checkpoint: Path, text: Path, out: Path, request: Request) -> tuple[str, dict]:
    """Compresses the Hugging Face checkpoint directory `checkpoint` as `request` asks, from
    calibration batches `[4, min(128, context)]` of consecutive tokens of the UTF-8 file `text`
    (its own tokenizer), and writes `out` as a checkpoint directory `transformers` and
    `eval.py --hf` read (config fields and tokenizer files carried over). A method that changes
    the architecture writes the new one; Read-ME's token-id router has no Hugging Face form."""
    import numpy as np
    from flax import nnx

    from moejax.models.transformer import TransformerLM
    from moejax.pretrained import from_hf, to_hf
    from moejax.pretrained.text import load_tokenizer

    if not request.family.hf_form:
        raise ConfigError(f"--method {request.method} with --hf: its result has no HF form")
    tokenizer = load_tokenizer(checkpoint)
    model, model_config = from_hf(checkpoint)
    length = min(HF_CALIBRATION_LENGTH, model_config.max_seq_len)
    per_batch = HF_CALIBRATION_ROWS * length
    ids = np.asarray(tokenizer.encode(text.read_text(encoding="utf-8")).ids, np.int32)
    first, needed = request.calib_offset * per_batch, (request.calib_offset + request.calib_batches)
    if ids.size < needed * per_batch:
        raise ConfigError(
            f"--text: {text} has {ids.size} tokens; allowed: at least {needed * per_batch} "
            f"({needed} batches of {HF_CALIBRATION_ROWS} x {length} tokens)"
        )
    calibration = [
        ids[first + b * per_batch : first + (b + 1) * per_batch].reshape(-1, length)
        for b in range(request.calib_batches)
    ]
    start = time.perf_counter()
    result = request.family.run(model, model_config, calibration, request)
    seconds = time.perf_counter() - start
    if result.model_config is not None:
        model = TransformerLM(result.model_config, rngs=nnx.Rngs(0))
        nnx.update(model, result.params)
    to_hf(model, out, like=checkpoint)
    summary = (
        f"compressed {checkpoint} by {request.describe()}, from {request.calib_batches} "
        f"calibration batches of {text} (after {request.calib_offset}) in {seconds:.1f} s; "
        f"wrote {out}"
    )
    return summary, result.report


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
