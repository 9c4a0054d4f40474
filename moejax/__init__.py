"""moejax: routed experts, sparse attention and masked pruning in JAX / Flax NNX.

The layers are Flax NNX modules whose math lives in pure functions:

    from flax import nnx
    from moejax import MoELayer

    layer = MoELayer(d_model=256, d_ff=512, num_experts=8, top_k=2, rngs=nnx.Rngs(0))
    y, aux, _ = layer(x)  # x [batch, length, 256]; aux["aux_loss"] joins your loss

Subpackages: `routers` (one file per router, `RouterSpec` registry), `moe` (`DispatchSpec`
registry: capacity, dropless, expert_parallel, llep; the one SwiGLU), `sparse_attention` (block
masks, MoBA, routing), `pruning` (masks, schedules, the optax wrapper, N:M), `depth`
(mixture-of-depths, layer routers), `parallel` (meshes and logical axes, several processes,
ahead-of-time compiles), `config` (the typed experiment config of `train.py`), `pretrained`
(Hugging Face checkpoints in and out), `generation` (KV-cached decoding: `generate`).
"""

from importlib import metadata as _metadata

# Importing the router zoo registers every router by name, so a config string finds it.
from moejax import (
    config,
    depth,
    errors,
    generation,
    metrics,
    moe,
    parallel,
    pretrained,
    pruning,
    routers,
    sparse_attention,
)
from moejax.attention import Attention
from moejax.config import (
    Config,
    DepthConfig,
    DispatchConfig,
    ModelConfig,
    MoEConfig,
    RouterConfig,
)
from moejax.errors import ConfigError, UserError
from moejax.generation import generate
from moejax.models.moe_layer import MoELayer, RouterContext
from moejax.models.transformer import TransformerLM
from moejax.moe import DispatchOptions, DispatchSpec
from moejax.routers.base import RouterOptions, RouterSpec, RouterState, Routing
from moejax.sparse_attention import AttentionConfig, SparseAttention, masks

try:
    __version__ = _metadata.version("moejax")
except _metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0.1.0+unknown"

__all__ = [
    "Attention",
    "AttentionConfig",
    "Config",
    "ConfigError",
    "DepthConfig",
    "DispatchConfig",
    "DispatchOptions",
    "DispatchSpec",
    "MoEConfig",
    "MoELayer",
    "ModelConfig",
    "RouterConfig",
    "RouterContext",
    "RouterOptions",
    "RouterSpec",
    "RouterState",
    "Routing",
    "SparseAttention",
    "TransformerLM",
    "UserError",
    "__version__",
    "config",
    "depth",
    "errors",
    "generate",
    "generation",
    "masks",
    "metrics",
    "moe",
    "parallel",
    "pretrained",
    "pruning",
    "routers",
    "sparse_attention",
]
