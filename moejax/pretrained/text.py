"""Text in and out of a pretrained model: its tokenizer (from the checkpoint's `tokenizer.json`,
through the `tokenizers` library, no `transformers` needed) and sliding-window perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.errors import UserError
from moejax.models.transformer import TransformerLM


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` of checkpoint directory `path` (its `tokenizer.json`)."""
    try:
        import tokenizers
    except ImportError:
        raise UserError(
            "moejax.pretrained: reading a tokenizer needs the `tokenizers` package: "
            "pip install 'moejax[pretrained]'"
        ) from None
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise UserError(
            f"{path}: no tokenizer.json; moejax reads fast (tokenizers-library) tokenizers only"
        )
    return tokenizers.Tokenizer.from_file(str(file))


def special_token_ids(path: str | Path) -> dict[str, int | list[int] | None]:
    """`bos_token_id` and `eos_token_id` of checkpoint `path` (generation_config.json first,
    then config.json), None where neither says."""
    found: dict[str, int | list[int] | None] = {"bos_token_id": None, "eos_token_id": None}
    for name in ("config.json", "generation_config.json"):
        file = Path(path) / name
        if file.is_file():
            values = json.loads(file.read_text())
            found.update({k: values[k] for k in found if values.get(k) is not None})
    return found


def sliding_window_perplexity(
    model: TransformerLM,
    token_ids: np.ndarray,
    *,
    window: int,
    stride: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """Perplexity of `token_ids [n]` under `model`, scored in windows of `window` tokens that
    advance by `stride` (< window): each window scores only the tokens past the previous
    window's end, so every token after the first is scored once, with up to `window - stride`
    tokens of context before the new ones (the first window's tokens with less).

    Returns {"nll": mean negative log-likelihood per scored token (nats), "perplexity":
    exp(nll), "tokens": tokens scored}.
    """
    token_ids = np.asarray(token_ids, np.int32)
    n = token_ids.shape[0]
    if n < 2:
        raise UserError(f"perplexity: the text is {n} token(s); at least 2 are needed")
    if not 0 < stride < window:
        # A stride of a whole window would leave each window's first token without context.
        raise UserError(f"perplexity: stride {stride}; allowed: 0 < stride < window={window}")
    windows, targets = [], []
    scored_until = 1  # token 0 has no context
    begin = 0
    while scored_until < n:
        end = min(begin + window, n)
        row = np.zeros(window, np.int32)
        row[: end - begin] = token_ids[begin:end]
        # Position i predicts token i + 1; score the predictions of tokens not yet scored.
        mask = np.zeros(window, bool)
        mask[scored_until - 1 - begin : end - 1 - begin] = True
        windows.append(row)
        targets.append(mask)
        scored_until = end
        begin += stride
    graphdef, state = nnx.split(model)

    @jax.jit
    def window_nll(state, tokens, mask):
        logits, _ = nnx.merge(graphdef, state)(tokens, train=False)
        log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(mask[:, :-1], picked, 0.0))

    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        rows = np.stack(windows[start : start + batch_size])
        masks = np.stack(targets[start : start + batch_size])
        if rows.shape[0] < batch_size:  # one compiled shape: pad with unscored windows
            pad = batch_size - rows.shape[0]
            rows = np.concatenate([rows, np.zeros((pad, window), np.int32)])
            masks = np.concatenate([masks, np.zeros((pad, window), bool)])
        total += float(window_nll(state, jnp.asarray(rows), jnp.asarray(masks)))
        count += int(masks[:, :-1].sum())
    nll = total / count
    return {"nll": nll, "perplexity": float(np.exp(nll)), "tokens": count}
