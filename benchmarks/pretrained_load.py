"""Loading a ~1B-parameter Hugging Face MoE checkpoint onto a mesh: time and peak host memory.

    python benchmarks/pretrained_load.py [--dir /tmp/moejax-1b] [--layers 16] [--devices 8]

Writes a synthetic OLMoE checkpoint (random bfloat16 weights in the Hugging Face layout, shards
of about 500 MB with an index; d_model 1024, 16 layers, 32 experts of width 512, vocab 50304:
about 1.0 B parameters), then loads it with `moejax.pretrained.from_hf` in a fresh process with
`--devices` fake CPU devices on a mesh with experts split over all of them, and prints the load
time and the process's peak resident memory against its memory before the load and the size of
the model itself. On CPU devices the loaded model lives in host memory too, so what the loader
costs beyond the model is `peak - before - model`; the claim is that this stays about one shard
(the loader holds one parameter at a time, never the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 500 * 1024**2
CONFIG = {
    "model_type": "olmoe",
    "architectures": ["OlmoeForCausalLM"],
    "vocab_size": 50304,
    "hidden_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "intermediate_size": 512,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "norm_topk_prob": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}


def write_checkpoint(directory: Path, layers: int) -> tuple[int, int]:
    """Writes the synthetic checkpoint; returns (parameters, largest shard in bytes)."""
    import ml_dtypes

    from moejax.pretrained import config_from_hf
    from moejax.pretrained.safetensors import save_file

    directory.mkdir(parents=True, exist_ok=True)
    hf = dict(CONFIG, num_hidden_layers=layers)
    config, architecture, hf_config = config_from_hf(hf, dtype="bfloat16")
    from flax import nnx

    from moejax.models.transformer import TransformerLM
    from moejax.routers.base import RouterState

    abstract = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    _, params, router_state = nnx.split(abstract, nnx.Param, RouterState)
    targets = {"params": nnx.to_pure_dict(params), "router_state": nnx.to_pure_dict(router_state)}
    rng = np.random.default_rng(0)
    shards, shard, size, parameters = [], {}, 0, 0
    for tensor in architecture.tensors(config, hf_config):
        target = targets[tensor.collection]
        for key in tensor.path:
            target = target[key]
        value = rng.standard_normal(target.shape, np.float32) * 0.02
        parameters += value.size
        for name, array in zip(tensor.names, tensor.save(value), strict=True):
            array = np.ascontiguousarray(array).astype(ml_dtypes.bfloat16)
            if shard and size + array.nbytes > SHARD_BYTES:
                shards.append(shard)
                shard, size = {}, 0
            shard[name] = array
            size += array.nbytes
    shards.append(shard)
    weight_map, largest = {}, 0
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / file)
        weight_map.update(dict.fromkeys(tensors, file))
        largest = max(largest, sum(a.nbytes for a in tensors.values()))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(json.dumps(hf))
    return parameters, largest


LOAD = """
import json, resource, sys, time
import jax
from moejax.parallel.sharding import make_mesh
from moejax.pretrained import from_hf

def rss_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

devices = len(jax.devices())
mesh = make_mesh({"data": 1, "fsdp": 1, "expert": devices, "tensor": 1})
jax.numpy.zeros(1).block_until_ready()
before = rss_now()
start = time.perf_counter()
model, config = from_hf(sys.argv[1], dtype="bfloat16", mesh=mesh)
leaves = jax.tree.leaves(jax.tree.map(lambda v: v, __import__("flax").nnx.state(model)))
jax.block_until_ready(leaves)
seconds = time.perf_counter() - start
expert_weight = model.blocks[0].ffn.w_gate[...]
print(json.dumps({
    "seconds": seconds,
    "before": before,
    "peak": rss_peak(),
    # Replicated parameters are held once per CPU device: count every device's copy.
    "model_bytes": sum(s.data.nbytes for x in leaves for s in x.addressable_shards),
    "expert_shard_shape": list(expert_weight.addressable_shards[0].data.shape),
    "expert_shape": list(expert_weight.shape),
    "devices": devices,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moejax-1b-olmoe"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    parameters, largest = write_checkpoint(args.dir, args.layers)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(args.dir)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(f"the load failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    gib = 1024**3
    overhead = measured["peak"] - measured["before"] - measured["model_bytes"]
    print(
        f"checkpoint: {parameters / 1e9:.2f} B parameters, bfloat16, largest shard "
        f"{largest / gib:.2f} GiB, {args.dir}"
    )
    print(f"| load onto {measured['devices']} CPU devices (experts split) | value |")
    print("|---|---|")
    print(f"| load time | {measured['seconds']:.1f} s |")
    print(f"| model in memory (all devices' copies) | {measured['model_bytes'] / gib:.2f} GiB |")
    grown = (measured["peak"] - measured["before"]) / gib
    print(f"| peak RSS - RSS before the load | {grown:.2f} GiB |")
    print(f"| beyond the model (loader overhead) | {overhead / gib:.2f} GiB |")
    print(f"| largest shard | {largest / gib:.2f} GiB |")
    print(
        f"| one expert weight, global / per device | {measured['expert_shape']} / "
        f"{measured['expert_shard_shape']} |"
    )
    print(
        f"summary: load {measured['seconds']:.1f} s, overhead {overhead / gib:.2f} GiB vs "
        f"largest shard {largest / gib:.2f} GiB"
    )


if __name__ == "__main__":
    main()
