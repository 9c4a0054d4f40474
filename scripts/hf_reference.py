"""Tiny random Hugging Face checkpoints and `transformers` reference outputs for moejax's tests.

Runs only in .venv-hf (Python 3.11 with torch and transformers, made by scripts/setup.sh); the
tests call it through tests/pretrained/reference.py, never import it.

    python scripts/hf_reference.py build --out DIR [--arch NAME ...]
    python scripts/hf_reference.py logits --model DIR --tokens T.npy --out L.npy [--dtype bfloat16]
    python scripts/hf_reference.py decode --model DIR --prompt P.npy --new 16 --out D.npz

`build` writes DIR/NAME (config.json, safetensors, tokenizer files, reference.npz) for each
architecture and prints a JSON summary of what it saved to stdout.
"""

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast  # noqa: E402

VOCAB_SIZE = 128
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BATCH, SEQ_LEN, PROMPT_LEN, NEW_TOKENS = 2, 12, 8, 16
# Every architecture gets the same tokens from this seed, and its weights from a seed of its own.
TOKEN_SEED = 1234

# Shared by every tiny config; the special ids match the tokenizer's special tokens.
COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=64,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)


def llama_config() -> transformers.PreTrainedConfig:
    # llama3 rope with original_max_position_embeddings=32 and head_dim 16: wavelengths
    # 6.3 (kept), 20 (smoothed) and 63 and up (divided by factor), so each branch is used.
    return transformers.LlamaConfig(
        **COMMON,
        intermediate_size=96,
        num_hidden_layers=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    )


def llama_tied_config() -> transformers.PreTrainedConfig:
    return transformers.LlamaConfig(
        **COMMON,
        intermediate_size=96,
        num_hidden_layers=2,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    )


def mixtral_config() -> transformers.PreTrainedConfig:
    return transformers.MixtralConfig(
        **COMMON,
        intermediate_size=48,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )


def olmoe_config() -> transformers.PreTrainedConfig:
    return transformers.OlmoeConfig(
        **COMMON,
        intermediate_size=48,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )


def qwen2_moe_config() -> transformers.PreTrainedConfig:
    return transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=96,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        num_hidden_layers=3,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        qkv_bias=True,
        mlp_only_layers=[1],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )


def qwen3_moe_config() -> transformers.PreTrainedConfig:
    # head_dim apart from hidden_size // num_attention_heads, as in the released Qwen3 MoEs.
    return transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=32,
        intermediate_size=96,
        moe_intermediate_size=48,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )


def deepseek_v3_config() -> transformers.PreTrainedConfig:
    # Every head size differs from the others so that a swapped one cannot pass; mscale and
    # mscale_all_dim differ so that the yarn factor on cos/sin is not 1.
    return transformers.DeepseekV3Config(
        **COMMON,
        intermediate_size=112,
        moe_intermediate_size=48,
        num_hidden_layers=3,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_mtp_layers=0,
        rope_interleave=True,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=16,
            mscale=1.0,
            mscale_all_dim=0.8,
            beta_fast=32.0,
            beta_slow=1.0,
        ),
    )


ARCHITECTURES: dict[str, Callable[[], transformers.PreTrainedConfig]] = {
    "llama": llama_config,
    "llama_tied": llama_tied_config,
    "mixtral": mixtral_config,
    "olmoe": olmoe_config,
    "qwen2_moe": qwen2_moe_config,
    "qwen3_moe": qwen3_moe_config,
    "deepseek_v3": deepseek_v3_config,
}
# Written in several shards with an index, as large checkpoints are.
SHARDED = {"mixtral": "150KB"}

# config.json as the released checkpoints spell it (transformers 4.x wrote them), so that a loader
# meets both spellings: rope_theta and rope_scaling (DeepSeek's with "type") in place of 5.x's
# rope_parameters, and Qwen3's num_experts in place of num_local_experts.
RELEASED_STYLE = {"llama", "qwen3_moe", "deepseek_v3"}


def as_released(name: str, config: dict) -> dict:
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    type_key = "type" if name == "deepseek_v3" else "rope_type"
    config["rope_scaling"] = None if kind == "default" else {type_key: kind, **rope}
    if name == "qwen3_moe":
        config["num_experts"] = config.pop("num_local_experts")
    return dict(sorted(config.items()))


# The config.json fields a loader reads (those present in each config are reported).
CONFIG_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "qk_head_dim",
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "qkv_bias",
    "mlp_bias",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "rope_interleave",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "mlp_only_layers",
    "decoder_sparse_step",
    "first_k_dense_replace",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "clip_qkv",
    "sliding_window",
    "use_sliding_window",
    "max_position_embeddings",
    "dtype",
)

TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a mixture of experts routes each token to a few experts",
    "sparse models keep most of their weights idle for any one token",
    "the router picks the top two experts and mixes their outputs",
]


def load(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The checkpoint as `transformers` runs it: eager attention, the per-expert loop."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every learned tensor at a scale where each one moves the logits.

    HF's init (std 0.02, norms at 1, biases and the DeepSeek score bias at 0) leaves a dropped
    norm, a zero bias or a transposed projection nearly invisible in the logits.
    """
    generator = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    learned = dict(model.named_parameters())
    learned.update((name, b) for name, b in model.named_buffers() if name.endswith("_bias"))
    with torch.no_grad():
        for name, tensor in learned.items():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            if tensor.ndim == 1 and name.endswith("bias"):
                value = 0.3 * noise
            elif tensor.ndim == 1:
                value = 1.0 + 0.3 * noise  # RMSNorm scales
            elif name.endswith("embed_tokens.weight"):
                # Tied, it is also the output projection: keep the logits of order 1 there.
                value = noise * (2.0 / math.sqrt(tensor.shape[-1]) if tied else 1.0)
            else:
                # [out, in] and the fused experts' [experts, out, in]: unit-variance outputs.
                value = noise / math.sqrt(tensor.shape[-1])
            tensor.copy_(value.to(tensor.dtype))


def prefill_logits(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    """logits: [batch, seq, vocab] float32 for tokens: [batch, seq]."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits.float().numpy()


def greedy_decode(
    model: torch.nn.Module, prompt: np.ndarray, new: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decode with the KV cache: tokens [batch, new] and raw logits [batch, new, vocab].

    `output_logits` gives the model's logits; `output_scores` would give them after the logits
    processors. Without an eos every row runs the full `new` steps.
    """
    ids = torch.from_numpy(prompt.astype(np.int64))
    # generate() fills each field left None from the model's generation_config, so an
    # `eos_token_id=None` passed in is replaced by the checkpoint's eos; clear it at the source.
    model.generation_config.eos_token_id = None
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=new,
        pad_token_id=PAD_ID,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    tokens = out.sequences[:, ids.shape[1] :].numpy().astype(np.int32)
    logits = torch.stack(out.logits, dim=1).float().numpy()
    return tokens, logits


def save_tokenizer(out: Path) -> None:
    """A word-level BPE of at most VOCAB_SIZE ids, special tokens first."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials)
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in specials] == [PAD_ID, BOS_ID, EOS_ID, UNK_ID]
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    ).save_pretrained(out)


def saved_tensors(out: Path) -> dict[str, list[int]]:
    shapes = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(path, "np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                shapes[key] = list(f.get_slice(key).get_shape())
    return dict(sorted(shapes.items()))


def build_one(name: str, out: Path) -> dict:
    arch_seed = 1 + list(ARCHITECTURES).index(name)
    torch.manual_seed(arch_seed)
    model = AutoModelForCausalLM.from_config(
        ARCHITECTURES[name](),
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    ).eval()
    randomize(model, arch_seed)
    save_kwargs = {"max_shard_size": SHARDED[name]} if name in SHARDED else {}
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    save_tokenizer(out)
    if name in RELEASED_STYLE:
        config_file = out / "config.json"
        config = as_released(name, json.loads(config_file.read_text()))
        config_file.write_text(json.dumps(config, indent=2) + "\n")

    rng = np.random.default_rng(TOKEN_SEED)
    tokens = rng.integers(0, VOCAB_SIZE, (BATCH, SEQ_LEN), dtype=np.int32)
    decode_prompt = rng.integers(0, VOCAB_SIZE, (BATCH, PROMPT_LEN), dtype=np.int32)

    # The references come from the saved checkpoint as from_pretrained reads it, which is what a
    # loader reads too; the in-memory model checks that the save lost nothing.
    reloaded = load(out)
    logits = prefill_logits(reloaded, tokens)
    np.testing.assert_allclose(logits, prefill_logits(model, tokens), rtol=1e-5, atol=1e-5)
    decode_tokens, decode_logits = greedy_decode(reloaded, decode_prompt, NEW_TOKENS)
    logits_bf16 = prefill_logits(load(out, torch.bfloat16), tokens)
    np.savez(
        out / "reference.npz",
        tokens=tokens,
        logits=logits,
        logits_bf16=logits_bf16,
        decode_prompt=decode_prompt,
        decode_tokens=decode_tokens,
        decode_logits=decode_logits,
    )

    config = json.loads((out / "config.json").read_text())
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "config": {key: config[key] for key in CONFIG_KEYS if key in config},
        "tensors": saved_tensors(out),
        "logits_std": float(logits.std()),
        "logits_bf16_max_abs_diff": float(np.abs(logits_bf16 - logits).max()),
        "decode_tokens": decode_tokens.tolist(),
    }


def build(args: argparse.Namespace) -> None:
    summary = {}
    for name in args.arch or list(ARCHITECTURES):
        start = time.perf_counter()
        summary[name] = build_one(name, args.out / name)
        summary[name]["build_seconds"] = round(time.perf_counter() - start, 2)
    summary["transformers_version"] = transformers.__version__
    summary["torch_version"] = torch.__version__
    json.dump(summary, sys.stdout, indent=1)
    print()


def logits(args: argparse.Namespace) -> None:
    model = load(args.model, getattr(torch, args.dtype))
    np.save(args.out, prefill_logits(model, np.load(args.tokens)))


def logits_many(args: argparse.Namespace) -> None:
    """Prefill logits of several checkpoints in one process (torch's import is the cost):
    `--pairs DIR TOKENS.npy ...`, written to `--out` as an npz keyed by pair index."""
    pairs = list(zip(args.pairs[::2], args.pairs[1::2], strict=True))
    results = {
        str(i): prefill_logits(load(Path(model_dir)), np.load(tokens))
        for i, (model_dir, tokens) in enumerate(pairs)
    }
    np.savez(args.out, **results)


def decode(args: argparse.Namespace) -> None:
    tokens, decode_logits = greedy_decode(load(args.model), np.load(args.prompt), args.new)
    np.savez(args.out, tokens=tokens, logits=decode_logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True)
    p = commands.add_parser("build", help="write the tiny checkpoints and their references")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", nargs="+", choices=list(ARCHITECTURES))
    p.set_defaults(run=build)
    p = commands.add_parser("logits", help="prefill logits of a checkpoint, float32")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--tokens", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.set_defaults(run=logits)
    p = commands.add_parser("logits-many", help="prefill logits of several checkpoints")
    p.add_argument("--pairs", nargs="+", required=True, help="DIR TOKENS.npy, repeated")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=logits_many)
    p = commands.add_parser("decode", help="greedy cached decode: tokens and raw logits")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompt", type=Path, required=True)
    p.add_argument("--new", type=int, default=NEW_TOKENS)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=decode)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    # Tiny matrices: a second thread only waits, and on a busy machine (pytest -n 2) it spins.
    torch.set_num_threads(1)
    # A failure's stderr reaches the test report; keep it to the error.
    transformers.utils.logging.disable_progress_bar()
    args.run(args)


if __name__ == "__main__":
    main()
