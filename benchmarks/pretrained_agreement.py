"""How closely moejax reproduces `transformers` on each pretrained architecture.

    python benchmarks/pretrained_agreement.py [--out /tmp/moejax-hf]

Builds the tiny random checkpoints of `scripts/hf_reference.py` with `transformers` (in
`.venv-hf`, see scripts/setup.sh), loads each with `moejax.pretrained.from_hf` and prints, per
architecture: the largest |logit difference| over the logits' largest |logit| for prefill
(float32) and for 16 greedy KV-cached decode steps, the bfloat16 median difference over the
logits' standard deviation (both sides in bfloat16), and the round trip: `to_hf`'s export loaded
back by `transformers`, its largest |difference| from the original's logits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moejax.generation import generate  # noqa: E402
from moejax.pretrained import from_hf, to_hf  # noqa: E402
from tests.pretrained.reference import (  # noqa: E402
    ARCHITECTURES,
    build_checkpoints,
    reference_logits_many,
    require_reference,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    require_reference()
    out = args.out or Path(tempfile.mkdtemp(prefix="moejax-hf-"))
    checkpoints = build_checkpoints(out)
    rows, pairs = [], []
    for name in ARCHITECTURES:
        with np.load(checkpoints[name] / "reference.npz") as data:
            reference = dict(data)
        model, _ = from_hf(checkpoints[name])
        logits = np.asarray(model(jnp.asarray(reference["tokens"]), train=False)[0])
        scale = np.abs(reference["logits"]).max()
        prefill = np.abs(logits - reference["logits"]).max() / scale
        prompts = [list(p) for p in reference["decode_prompt"]]
        decoded = generate(model, prompts, max_new_tokens=reference["decode_tokens"].shape[1])
        same_tokens = np.array_equal(np.array(decoded.tokens), reference["decode_tokens"])
        decode = np.abs(decoded.logits - reference["decode_logits"]).max() / scale
        bf16_model, _ = from_hf(checkpoints[name], dtype="bfloat16")
        bf16 = np.asarray(bf16_model(jnp.asarray(reference["tokens"]), train=False)[0])
        bf16_median = np.median(np.abs(bf16 - reference["logits_bf16"])) / reference["logits"].std()
        exported = to_hf(model, out / "exported" / name, like=checkpoints[name])
        pairs.append((exported, reference["tokens"]))
        rows.append([name, prefill, decode, same_tokens, bf16_median, reference["logits"]])
    round_trips = reference_logits_many(pairs)
    print(
        "| architecture | prefill max|Δ|/max|logit| | decode (16 cached steps) | same tokens "
        "| bf16 median|Δ|/std | round trip max|Δ| |"
    )
    print("|---|---|---|---|---|---|")
    for (name, prefill, decode, same, bf16, expected), back in zip(rows, round_trips, strict=True):
        trip = np.abs(back - expected).max()
        print(
            f"| {name} | {prefill:.1e} | {decode:.1e} | {'yes' if same else 'NO'} | "
            f"{bf16:.3f} | {trip:.1e} |"
        )


if __name__ == "__main__":
    main()
