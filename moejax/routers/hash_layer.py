"""Hash routing: experts fixed by a hash of the token id (Roller et al., "Hash Layers For Large
Sparse Models", 2021); the hashing is in `moejax.routers._hashing`.
"""

import jax

from moejax.routers._hashing import fixed_routing, hash_expert_index
from moejax.routers.base import (
    RouterSpec,
    Routing,
    TopKOptions,
    check_router_inputs,
    check_token_ids,
    register,
    require,
)


def hash_router(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    token_ids: jax.Array | None = None,
    hash_seed: int = 0,
    gate: str = "uniform",
) -> Routing:
    """Experts chosen by a fixed hash of the token id (see `hash_expert_index`).

    Roller et al., "Hash Layers For Large Sparse Models" (2021). The paper's hash layer has no
    gate; with `gate="uniform"` every chosen expert weighs 1 / top_k (1 for top_k = 1) and the
    router logits only feed the monitored losses. `gate="softmax"` weighs the hashed experts by
    the router's softmax there (renormalised over them by `renormalize`), so a learned router
    still scales the outputs.

    Args:
      router_logits: [tokens, num_experts]; the choice does not depend on them.
      top_k: experts per token, in [1, num_experts].
      renormalize: for `gate="softmax"`, rescale the gates to sum to 1 per token.
      token_ids: [tokens] int, required.
      hash_seed: which hash function.
      gate: "uniform" or "softmax".

    Returns:
      A `Routing` with aux_losses "load_balance" (0.0: the choice cannot be balanced by a
      loss), "load_balance_unweighted" and "router_z".
    """
    num_experts = check_router_inputs(router_logits, top_k)
    token_ids = check_token_ids(token_ids, router_logits.shape[0], "hash_layer")
    require(isinstance(hash_seed, int), "hash_seed", hash_seed, "an int")
    expert_index = hash_expert_index(token_ids, num_experts, top_k, hash_seed)
    return fixed_routing(router_logits, expert_index, renormalize=renormalize, gate=gate)


SPEC = register(
    RouterSpec("hash_layer", hash_router, needs=("router_logits", "token_ids"), options=TopKOptions)
)
