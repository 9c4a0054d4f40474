"""`from_hf` and `to_hf`: Hugging Face checkpoint directories into moejax models and back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from moejax.config import ModelConfig
from moejax.errors import UserError
from moejax.models.transformer import TransformerLM
from moejax.parallel.sharding import logical_axes, logical_to_mesh
from moejax.pretrained.architecture import Architecture, HFConfig, get
from moejax.pretrained.checkpoint import INDEX, SINGLE, Checkpoint
from moejax.pretrained.mapping import Tensor
from moejax.pretrained.safetensors import DTYPES, save_file
from moejax.routers.base import RouterState

# Tensors a checkpoint may hold that carry nothing a model needs (precomputed rotary tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Files besides the weights that belong to a checkpoint and travel with an export.
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
DEFAULT_SHARD_BYTES = 2 * 1024**3
FLOAT_DTYPES = tuple(DTYPES[name] for name in ("F64", "F32", "F16", "BF16"))


def _lookup(tree: Mapping, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _assign(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _leaf_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in _leaf_paths(v, (*prefix, k))]
    return [prefix]


def config_from_hf(
    path_or_config: str | Path | Mapping, *, dtype: str = "float32", param_dtype: str | None = None
) -> tuple[ModelConfig, Architecture, HFConfig]:
    """The `ModelConfig` of a checkpoint directory (or its config.json as a dict), with its
    architecture and config; `dtype`/`param_dtype` are moejax's activation and parameter
    dtypes ("float32" or "bfloat16")."""
    if isinstance(path_or_config, Mapping):
        hf = HFConfig(path_or_config)
    else:
        hf = HFConfig(Checkpoint(path_or_config).config, f"{path_or_config}/config.json")
    architecture = get(hf.require("model_type"), hf.source)
    fields = architecture.to_config(hf)
    config = ModelConfig(**fields, dtype=dtype, param_dtype=param_dtype or dtype)
    return config, architecture, hf


def _expected_shapes(tensor: Tensor, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The checkpoint shapes `tensor` reads for a moejax array of `shape`."""
    # A zero-stride view: every reshape and transpose of it is a view too, so this allocates
    # nothing (except the rows a permutation gathers).
    return [a.shape for a in tensor.save(np.broadcast_to(np.float32(0), shape))]


def from_hf(
    path: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    mesh: Mesh | None = None,
) -> tuple[TransformerLM, ModelConfig]:
    """Loads a Hugging Face checkpoint directory into moejax's `TransformerLM`.

    Reads config.json and the safetensors weights (one file or shards with an index), tensor by
    tensor: each is converted to moejax's layout and `param_dtype`, and placed on `mesh` with
    its parameter sharding (experts split over `expert`) before the next is read, so host
    memory holds about one parameter at a time. Calling the model on `tokens [batch, length]`
    gives logits `[batch, length, vocab]` first.

    Raises `UserError` naming the file or tensor for an unsupported architecture or option, a
    missing shard or tensor, a shape or dtype that does not fit the config, a tensor the
    config does not use, or a checkpoint with only pickled `.bin` weights.
    """
    config, _, _ = config_from_hf(path, dtype=dtype, param_dtype=param_dtype)
    graphdef, values, _ = _load(path, config, mesh=mesh, strict=True)
    return nnx.merge(graphdef, values["params"], values["router_state"]), config


def load_state(
    path: str | Path,
    config: ModelConfig,
    *,
    mesh: Mesh | None = None,
    strict: bool = True,
) -> tuple[dict[str, dict], list[str]]:
    """The checkpoint's arrays for a model of `config`: ({"params": pure dict, "router_state":
    pure dict}, the moejax paths left out), each array in `config.param_dtype` on `mesh`.

    `config` may differ from the checkpoint's own model config where a run changes it (another
    router, another dispatch): with `strict=False` a checkpoint tensor with no place in
    `config`'s model is skipped and a parameter of that model with no tensor is left out (the
    caller keeps its initial value); with `strict=True` both are errors. A shape that differs
    is an error either way.
    """
    _, values, left_out = _load(path, config, mesh=mesh, strict=strict)
    return values, left_out


def _load(path, config: ModelConfig, *, mesh: Mesh | None, strict: bool):
    """`load_state`, with the model's graph definition first."""
    checkpoint = Checkpoint(path)
    own, architecture, hf = config_from_hf(path)
    abstract = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    graphdef, params, router_state = nnx.split(abstract, nnx.Param, RouterState)
    targets = {"params": nnx.to_pure_dict(params), "router_state": nnx.to_pure_dict(router_state)}
    axes = {"params": logical_axes(params), "router_state": logical_axes(router_state)}
    values: dict[str, dict] = {"params": {}, "router_state": {}}
    used = set()
    for tensor in architecture.tensors(own, hf):
        try:
            target = _lookup(targets[tensor.collection], tensor.path)
        except KeyError:
            if strict:
                raise
            continue
        expected = _expected_shapes(tensor, target.shape)
        arrays = []
        for name, shape in zip(tensor.names, expected, strict=True):
            array = checkpoint.tensor(name)
            if array.shape != shape:
                raise UserError(
                    f"{checkpoint.path}: tensor {name!r} has shape {array.shape}; the model "
                    f"({config_summary(config)}) makes it {shape}"
                )
            if array.dtype not in FLOAT_DTYPES:
                raise UserError(
                    f"{checkpoint.path}: tensor {name!r} has dtype {array.dtype}; expected a "
                    "floating dtype (float32, bfloat16, float16)"
                )
            arrays.append(array)
            used.add(name)
        value = np.asarray(tensor.load(arrays, target.shape), dtype=target.dtype)
        if mesh is None:
            placed = jnp.asarray(value)
        else:
            names = _lookup(axes[tensor.collection], tensor.path)
            placed = jax.device_put(value, NamedSharding(mesh, logical_to_mesh(names, mesh)))
        _assign(values[tensor.collection], tensor.path, placed)
        del value, arrays
    left_out = _left_out(targets, values)
    if strict:
        _check_complete(checkpoint, left_out, used, own)
    checkpoint.close()
    return graphdef, values, left_out


def _left_out(targets: dict, values: dict) -> list[str]:
    """The paths of `targets` that `values` does not hold, as "collection/a/b/c"."""
    missing = []
    for collection, tree in targets.items():
        for leaf in _leaf_paths(tree):
            try:
                _lookup(values[collection], leaf)
            except KeyError:
                missing.append("/".join(map(str, (collection, *leaf))))
    return missing


def _check_complete(checkpoint, left_out, used, config) -> None:
    if left_out:
        raise UserError(
            f"moejax.pretrained: no checkpoint tensor maps to {left_out[0]} of the "
            f"{checkpoint.config.get('model_type')} model; this config combination is not "
            "supported"
        )
    unused = sorted(
        name
        for name in checkpoint.files
        if name not in used
        and not name.endswith(IGNORED_SUFFIXES)
        and not (config.tie_embeddings and name == "lm_head.weight")
    )
    if unused:
        raise UserError(
            f"{checkpoint.path}: tensor {unused[0]!r} is not used by the model config.json "
            f"describes ({len(unused)} unused in all); a field the loader does not read may be "
            "set (an unsupported variant)"
        )


def config_summary(config: ModelConfig) -> str:
    return (
        f"d_model={config.d_model}, heads={config.num_heads}, kv_heads={config.num_kv_heads}, "
        f"head_dim={config.head_dim}, vocab={config.vocab_size}"
    )


def to_hf(
    model: TransformerLM,
    out_dir: str | Path,
    *,
    like: str | Path | None = None,
    model_type: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Writes `model` as a Hugging Face checkpoint directory that `transformers` loads.

    The architecture is `model_type` or that of `like`, a checkpoint directory whose config
    fields moejax does not model (token ids, ...) and tokenizer files are carried over (the
    checkpoint the model was loaded from, typically). Weights are written in the model's
    parameter dtype as safetensors shards of at most `max_shard_bytes`, with an index when
    there are several. Returns `out_dir`.
    """
    config: ModelConfig = model.config
    base = dict(Checkpoint(like).config) if like is not None else {}
    model_type = model_type or base.get("model_type")
    if model_type is None:
        raise UserError("to_hf: give model_type= (e.g. 'olmoe') or like= a checkpoint directory")
    architecture = get(model_type, "to_hf model_type")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "router_state": nnx.to_pure_dict(nnx.state(model, RouterState)),
    }
    hf_config = {
        key: value
        for key, value in base.items()
        if key not in ("rope_parameters", "rope_scaling", "rope_theta")
    }
    hf_config.update(architecture.to_hf(config))
    hf_config.update(
        model_type=model_type,
        architectures=[architecture.hf_class],
        torch_dtype=config.param_dtype,
    )
    table = architecture.tensors(config, HFConfig(hf_config))

    def converted(tensor: Tensor) -> dict[str, np.ndarray]:
        value = np.asarray(jax.device_get(_lookup(state[tensor.collection], tensor.path)))
        arrays = tensor.save(value)
        return {n: np.ascontiguousarray(a) for n, a in zip(tensor.names, arrays, strict=True)}

    _write_shards(table, state, converted, out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if like is not None:
        for name in COMPANION_FILES:
            if (Path(like) / name).is_file():
                shutil.copyfile(Path(like) / name, out / name)
    return out


def _write_shards(table, state, converted, out: Path, max_shard_bytes: int) -> None:
    """Writes the tensors of `table` in shards of at most `max_shard_bytes` (a moejax array
    is never split), converting one shard's arrays at a time so that host memory holds one
    shard, not the model."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for tensor in table:
        nbytes = _lookup(state[tensor.collection], tensor.path).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    for stale in [*out.glob("model*.safetensors"), out / INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file({k: v for t in shards[0] for k, v in converted(t).items()}, out / SINGLE)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: v for t in shard for k, v in converted(t).items()}
        save_file(tensors, out / file)
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
