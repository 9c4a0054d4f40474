"""Moving assignment rows between token order and expert order by gathers, both ways round.

What the capacity and dropless strategies share: each assignment's rank among those of its
expert, and the custom-VJP row gathers that fill expert rows and collect them back (autodiff of a
gather would emit scatter-adds; both directions stay gathers).
"""

import dataclasses

import jax
import jax.numpy as jnp


def rank_within_expert(expert: jax.Array, num_experts: int) -> jax.Array:
    """[n] int32: how many of the entries before each one chose the same expert.

    A stable sort by expert lists each expert's entries in their order; an entry's rank is its
    sorted position less its expert's first one.
    """
    order = jnp.argsort(expert, stable=True)  # [n]
    counts = jnp.bincount(expert, length=num_experts)  # [experts]
    first = (jnp.cumsum(counts) - counts).astype(jnp.int32)  # [experts]
    sorted_rank = jnp.arange(expert.shape[0], dtype=jnp.int32) - first[expert[order]]  # [n]
    return unpermute(sorted_rank, order)


def unpermute(values: jax.Array, order: jax.Array) -> jax.Array:
    """values[i] returned to position order[i]: the inverse of `values = original[order]`."""
    return jnp.zeros_like(values).at[order].set(values, unique_indices=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotRows:
    """Where each routing assignment sits among the expert rows, both ways round.

    Attributes:
      buffer_row: [tokens, top_k] int32, the expert row of each assignment; rows past the last
        (num_rows or more) mean dropped.
      assignment: [num_rows] int32, the token-major assignment (token * top_k + choice) each row
        holds; tokens * top_k marks an empty row.
    """

    buffer_row: jax.Array
    assignment: jax.Array

    @classmethod
    def build(cls, buffer_row: jax.Array, num_rows: int) -> "SlotRows":
        """From each assignment's row; no two kept assignments may share one."""
        num_assignments = buffer_row.size
        assignment = jnp.full((num_rows,), num_assignments, jnp.int32)
        ids = jnp.arange(num_assignments, dtype=jnp.int32)
        assignment = assignment.at[buffer_row.reshape(-1)].set(ids, mode="drop")  # [rows]
        return cls(buffer_row.astype(jnp.int32), assignment)


def gather_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
    """rows[index] for [n, d] rows and [m] indices; zeros where an index is n or more."""
    return rows.at[index].get(mode="fill", fill_value=0)


# Filling expert rows and collecting them back are each other's transposes, and both are row
# gathers: custom VJPs keep the backward pass a gather too, where autodiff would emit scatter-adds.
@jax.custom_vjp
def dispatch_rows(x: jax.Array, rows: SlotRows) -> jax.Array:
    """x [tokens, d_model] -> [num_rows, d_model]: each row its assignment's token, or zeros."""
    top_k = rows.buffer_row.shape[1]
    return gather_rows(x, rows.assignment // top_k)


def _dispatch_rows_fwd(x: jax.Array, rows: SlotRows) -> tuple[jax.Array, SlotRows]:
    return dispatch_rows(x, rows), rows


def _dispatch_rows_bwd(rows: SlotRows, d_rows: jax.Array) -> tuple[jax.Array, None]:
    # A token's gradient is the sum of its assignments' rows' gradients.
    per_assignment = collect_rows(d_rows, rows)  # [tokens, top_k, d_model]
    accumulate_dtype = jnp.promote_types(d_rows.dtype, jnp.float32)
    return jnp.sum(per_assignment, axis=1, dtype=accumulate_dtype).astype(d_rows.dtype), None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def collect_rows(expert_rows: jax.Array, rows: SlotRows) -> jax.Array:
    """[num_rows, d_model] -> [tokens, top_k, d_model]: each assignment's row, zeros if dropped."""
    num_tokens, top_k = rows.buffer_row.shape
    collected = gather_rows(expert_rows, rows.buffer_row.reshape(-1))  # [tokens*k, d_model]
    return collected.reshape(num_tokens, top_k, -1)


def _collect_rows_fwd(expert_rows: jax.Array, rows: SlotRows) -> tuple[jax.Array, SlotRows]:
    return collect_rows(expert_rows, rows), rows


def _collect_rows_bwd(rows: SlotRows, d_out: jax.Array) -> tuple[jax.Array, None]:
    # Each row has at most one assignment, so its gradient is that assignment's, or zero.
    return gather_rows(d_out.reshape(-1, d_out.shape[-1]), rows.assignment), None


collect_rows.defvjp(_collect_rows_fwd, _collect_rows_bwd)
