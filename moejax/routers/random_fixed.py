"""Random-fixed routing: experts fixed per token id by a seeded random table (the "random-fixed"
baseline of "Equifinality in Mixture of Experts"); the table is in `moejax.routers._hashing`.
"""

import jax

from moejax.routers._hashing import fixed_routing, random_fixed_table
from moejax.routers.base import (
    RouterSpec,
    Routing,
    TopKOptions,
    check_router_inputs,
    check_token_ids,
    register,
    require,
)


def random_fixed(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    token_ids: jax.Array | None = None,
    table_seed: int = 0,
    vocab_size: int = 256,
    gate: str = "uniform",
) -> Routing:
    """Experts looked up in a random [vocab_size, top_k] table drawn once from `table_seed`.

    The "random-fixed" baseline of "Equifinality in Mixture of Experts: Routing Topology Does
    Not Determine Language Modeling Quality", in the spirit of Roller et al., "Hash Layers For
    Large Sparse Models" (2021). The default vocab_size 256 is this codebase's byte-level
    vocabulary. Ids outside [0, vocab_size) wrap modulo vocab_size (values cannot be checked
    under jit). Gates as in `hash_router`.

    Args:
      router_logits: [tokens, num_experts]; the choice does not depend on them.
      top_k: experts per token, in [1, num_experts].
      renormalize: for `gate="softmax"`, rescale the gates to sum to 1 per token.
      token_ids: [tokens] int, required.
      table_seed: seed of the table.
      vocab_size: rows of the table, >= 1.
      gate: "uniform" or "softmax".

    Returns:
      A `Routing` with aux_losses "load_balance" (0.0), "load_balance_unweighted" and
      "router_z".
    """
    num_experts = check_router_inputs(router_logits, top_k)
    token_ids = check_token_ids(token_ids, router_logits.shape[0], "random_fixed")
    require(isinstance(table_seed, int), "table_seed", table_seed, "an int")
    require(
        isinstance(vocab_size, int) and vocab_size >= 1, "vocab_size", vocab_size, "an int >= 1"
    )
    table = random_fixed_table(vocab_size, num_experts, top_k, table_seed)  # [vocab, top_k]
    expert_index = table[token_ids % vocab_size]  # [tokens, top_k]
    return fixed_routing(router_logits, expert_index, renormalize=renormalize, gate=gate)


SPEC = register(
    RouterSpec(
        "random_fixed", random_fixed, needs=("router_logits", "token_ids"), options=TopKOptions
    )
)
