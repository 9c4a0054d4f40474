"""A pod-sized mixture-of-experts language model: about 1.0B parameters, 32 experts, top-2.

16 layers of d_model 2048 (16 query heads and 8 key/value heads of 128), every layer a
mixture of 32 fine-grained SwiGLU experts of width 256 with top-2 routing, bfloat16
activations and float32 parameters, sequences of 2048 tokens, 256 sequences per step.

Parameters (`count_params` of the model's abstract state): 1,008,273,408 in all;
  experts        805,306,368  (16 layers x 32 experts x 3 x 2048 x 256)
  attention      201,326,592  (16 layers x (2048 x (2048 + 1024 + 1024) + 2048 x 2048))
  routers          1,048,576  (16 layers x 2048 x 32)
  norms, embedding   591,872  (33 x 2048 norm scales; byte-level vocabulary 256 x 2048, tied)
Active per token: 253,298,688 (everything but 30 of each layer's 32 experts).

Experts are sharded over mesh.expert=8 by default by the "expert_parallel" dispatch (tokens
travel between the expert shards by all-to-all; "llep" shares the load of hot experts, "dropless"
needs mesh.expert=1); the rest of the devices split the batch. It is meant for
`python -m moejax.training.aot --config configs/moe_1b.py --topology v5p:4x4x4` (a v5p-64), where
it compiles in the README's table; training it on the Shakespeare corpus is possible but
pointless.
"""

import dataclasses

from moejax.config import (
    Config,
    DataConfig,
    DispatchConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
)


def get_config() -> Config:
    return dataclasses.replace(
        Config(),
        model=ModelConfig(
            d_model=2048,
            num_layers=16,
            num_heads=16,
            num_kv_heads=8,
            head_dim=128,
            max_seq_len=2048,
            d_ff=8192,
            dtype="bfloat16",
            param_dtype="float32",
            moe=MoEConfig(
                num_experts=32,
                top_k=2,
                expert_d_ff=256,
                dispatch=DispatchConfig(name="expert_parallel"),
            ),
        ),
        data=DataConfig(seq_len=2048, global_batch_size=256, eval_batch_size=256),
        mesh=MeshConfig(data=-1, expert=8),
    )
