"""Each registered kind's plan function against its reference: the static kinds against
brute-force token masks, the routed kinds against their selection functions (themselves checked
against brute force in test_selection.py) with the top-k clamp, block sizes, visit bound, key
bias and state update the plan must add."""

import jax
import numpy as np
import pytest

from moejax.sparse_attention import KINDS, HeadShape
from moejax.sparse_attention.bilevel import bilevel_select
from moejax.sparse_attention.dynamic_mask import dynamic_mask_select, key_importance
from moejax.sparse_attention.moba import moba_select
from moejax.sparse_attention.routing import cluster_select, routing_centroid_update

B, T, H, KVH, D, BLOCK = 2, 64, 4, 2, 8, 8
BLOCKS = T // BLOCK
SHAPE = HeadShape(H, KVH, D)


def _context(spec, options):
    keys = jax.random.split(jax.random.key(0), 4)
    context = {
        "queries": jax.random.normal(keys[0], (B, T, H, D)),
        "keys": jax.random.normal(keys[1], (B, T, KVH, D)),
        "values": jax.random.normal(keys[2], (B, T, KVH, D)),
        "num_heads": H,
    }
    if spec.init_params is not None:
        context["params"] = spec.init_params(keys[3], SHAPE, options)
    if spec.state is not None:
        context["state"] = spec.state.init(keys[3], SHAPE, options)
    return context


def _plan(kind: str, **options):
    spec = KINDS[kind]
    options = spec.options(**options)
    context = _context(spec, options)
    needed = {need: context[need] for need in spec.needs}
    return spec.plan(length=T, block_size=BLOCK, options=options, **needed), context, options


def _blocks_of(token_mask: np.ndarray) -> np.ndarray:
    """`[T, T]` token mask -> `[blocks, blocks]`: a block pair is visited if any pair in it is."""
    return token_mask.reshape(BLOCKS, BLOCK, BLOCKS, BLOCK).any(axis=(1, 3))


POS = np.arange(T)
CAUSAL = POS[None, :] <= POS[:, None]  # [query, key]


def test_dense_plan_visits_every_causal_block():
    plan, _, _ = _plan("dense")
    np.testing.assert_array_equal(plan.block_mask[0, 0], _blocks_of(CAUSAL))
    assert plan.max_kv_blocks == BLOCKS and plan.window is None and plan.selected is None


@pytest.mark.parametrize("window", [1, 8, 20])
def test_local_plan_visits_the_blocks_of_the_exact_window(window):
    plan, _, _ = _plan("local", window=window)
    token_mask = CAUSAL & (POS[None, :] > POS[:, None] - window)
    np.testing.assert_array_equal(plan.block_mask[0, 0], _blocks_of(token_mask))
    assert plan.window == window


def test_global_local_plan_visits_global_and_window_blocks():
    plan, _, _ = _plan("global_local", window=16, num_global=8)
    near = POS[None, :] > POS[:, None] - 16
    is_global = (POS[None, :] < 8) | (POS[:, None] < 8)
    np.testing.assert_array_equal(plan.block_mask[0, 0], _blocks_of(CAUSAL & (near | is_global)))
    assert plan.window is None  # whole blocks: the band is block-granular


@pytest.mark.parametrize(("top_k", "query_block_size"), [(1, None), (2, 4), (100, None)])
def test_moba_plan_is_moba_select_with_its_own_block_and_a_clamped_top_k(top_k, query_block_size):
    plan, c, _ = _plan("moba", top_k=top_k, query_block_size=query_block_size)
    block_q = query_block_size or BLOCK
    clamped = min(top_k, BLOCKS - 1)
    reference = moba_select(c["queries"], c["keys"], block_q=block_q, block_kv=BLOCK, top_k=clamped)
    np.testing.assert_array_equal(plan.block_mask, reference.block_mask)
    np.testing.assert_array_equal(plan.selected, reference.selected)
    assert (plan.block_q, plan.block_kv) == (block_q, BLOCK)
    assert plan.max_kv_blocks == min(clamped + 1, BLOCKS)


def test_bilevel_plan_is_one_region_choice_for_all_heads():
    plan, c, _ = _plan("bilevel", top_k=2)
    reference = bilevel_select(c["queries"], c["keys"], block=BLOCK, top_k=2)
    np.testing.assert_array_equal(plan.block_mask, reference.block_mask)
    assert plan.block_mask.shape == (B, 1, BLOCKS, BLOCKS) and plan.max_kv_blocks == 3


def test_routing_plan_selects_by_cluster_and_moves_the_centroids():
    (plan, centroids), c, options = _plan("routing", top_k=2, window=12, num_clusters=3)
    band = 2  # ceil(12 / 8) blocks
    reference = cluster_select(
        c["queries"], c["keys"], c["state"], block=BLOCK, top_k=2, num_local=band
    )
    np.testing.assert_array_equal(plan.block_mask, reference.selection.block_mask)
    assert plan.max_kv_blocks == 2 + band
    expected = routing_centroid_update(c["state"], reference, momentum=options.centroid_momentum)
    np.testing.assert_allclose(np.asarray(centroids), np.asarray(expected), rtol=1e-6)
    assert not np.allclose(np.asarray(centroids), np.asarray(c["state"]))


def test_dynamic_mask_plan_keeps_important_blocks_and_biases_their_keys():
    plan, c, _ = _plan("dynamic_mask", top_k=2, window=16)
    importance = key_importance(c["values"], c["params"]["dma_delta"], c["params"]["dma_gain"])
    reference = dynamic_mask_select(importance, heads=H, block=BLOCK, top_k=2, num_local=2)
    np.testing.assert_array_equal(plan.block_mask, reference.block_mask)
    np.testing.assert_allclose(np.asarray(plan.key_bias), np.asarray(importance), rtol=1e-6)
    assert plan.max_kv_blocks == 4


def test_every_kind_has_a_plan_test():
    tested = {"dense", "local", "global_local", "moba", "bilevel", "routing", "dynamic_mask"}
    assert tested == set(KINDS)
