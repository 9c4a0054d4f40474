"""Least-Loaded Expert Parallelism, the "llep" dispatch strategy (`moejax.moe.llep`).

The plan is checked against a token-by-token Python planner on hypothesis-drawn count matrices;
the dispatch, on eight fake CPU devices (tests/conftest.py), against plain expert parallelism
(outputs and gradients, float32, rtol = atol = 2e-5) and a dense float64 reference (outputs,
rtol = atol = 1e-4), under routing skewed enough that plain expert parallelism loads one shard
with several times the mean.
"""

import functools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from expert_mesh import emulated_ragged_all_to_all, mesh_of, step_shardings
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import moe
from moejax.config import ConfigError, DispatchConfig, load_config_file, with_fields
from moejax.models.transformer import TransformerLM
from moejax.moe import _sharded, expert_parallel, llep
from moejax.parallel import sharding
from moejax.routers.base import Routing

NUM_EXPERTS, D_MODEL, D_FF, TOKENS, TOP_K = 16, 16, 32, 256, 2
MARGIN = 0.1
# (data, fsdp, expert, tensor)
# One expert group of 8 shards; data groups with tensor parallelism; fsdp groups, whose expert
# weights are gathered over fsdp at the shard_map boundary. Two processes: test_llep_two_process.
MESHES = [(1, 1, 8, 1), (2, 1, 2, 2), (1, 2, 4, 1)]


# The plan against a token-by-token planner.


def _reference_plan(counts: np.ndarray, margin: float, max_foreign: int):
    """Follows the rule of `moejax.llep` one row at a time.

    Returns:
      cap; worker: {(expert, source, rank among the source's rows of the expert): shard};
      borrowed: per shard, the experts of its slots in order; whether some run spanned more than
      max_foreign experts.
    """
    shards, num_experts = counts.shape
    local = num_experts // shards
    total = int(counts.sum())
    slack = np.floor(np.float32(margin) * np.float32(total) / np.float32(shards))
    cap = -(-total // shards) + int(slack)
    worker, excess, load = {}, [], [0] * shards
    for owner in range(shards):
        for expert in range(owner * local, (owner + 1) * local):
            for source in range(shards):
                for rank in range(counts[source, expert]):
                    row = (expert, source, rank)
                    if load[owner] < cap:
                        worker[row] = owner
                        load[owner] += 1
                    else:
                        excess.append(row)
    borrowed, overflow, taken = [], False, 0
    for shard in range(shards):
        spare = max(cap - load[shard], 0)
        run = excess[taken : taken + spare]
        taken += spare
        experts = list(dict.fromkeys(expert for expert, _, _ in run))
        overflow |= len(experts) > max_foreign
        borrowed.append(experts[:max_foreign])
        for row in run:
            worker[row] = shard if row[0] in borrowed[shard] else row[0] // local
    assert taken >= len(excess), "the runs cover the excess"
    return cap, worker, borrowed, overflow


def _plan_workers(plan: llep.LLEPPlan, counts: np.ndarray) -> dict:
    """{(expert, source, rank): shard} read from the plan's segments; asserts that no row lies
    in two segments."""
    shards, num_experts = counts.shape
    start, end = np.asarray(plan.segment_start), np.asarray(plan.segment_end)
    stream_start = np.asarray(plan.stream_start)
    worker = {}
    for expert in range(num_experts):
        for source in range(shards):
            for rank in range(counts[source, expert]):
                position = stream_start[source, expert] + rank
                inside = np.flatnonzero(
                    (start[:, expert] <= position) & (position < end[:, expert])
                )
                assert len(inside) <= 1, f"row {position} of expert {expert} in two segments"
                owner = expert // (num_experts // shards)
                worker[(expert, source, rank)] = int(inside[0]) if len(inside) else owner
    return worker


@st.composite
def _count_matrix(draw, shards: int, num_experts: int) -> np.ndarray:
    counts = np.array(
        draw(
            st.lists(
                st.integers(0, 6), min_size=shards * num_experts, max_size=shards * num_experts
            )
        ),
        np.int32,
    ).reshape(shards, num_experts)
    # A few hot experts, as under skewed routing.
    for expert in draw(st.lists(st.integers(0, num_experts - 1), max_size=3)):
        counts[:, expert] += draw(st.integers(0, 40))
    return counts


@st.composite
def _count_matrices(draw) -> list[np.ndarray]:
    """Two to six count matrices of one drawn shape: the plan compiles once per shape and
    max_foreign, so an example checks several matrices for one compilation."""
    shards = draw(st.sampled_from([1, 2, 3, 4, 8]))
    local = draw(st.integers(1, 3))
    return draw(st.lists(_count_matrix(shards, shards * local), min_size=2, max_size=6))


@functools.partial(jax.jit, static_argnames=("margin", "max_foreign"))
def _jit_plan(counts, *, margin, max_foreign):
    return llep.llep_plan(counts, margin=margin, max_foreign=max_foreign)


@settings(max_examples=25, deadline=None)
@given(
    matrices=_count_matrices(),
    margin=st.sampled_from([0.0, 0.05, 0.1, 0.5]),
    max_foreign=st.sampled_from([1, 2, 3, 24]),
)
def test_plan_matches_row_by_row_reference(matrices, margin, max_foreign):
    for counts in matrices:
        _check_plan(counts, margin, max_foreign)


def _check_plan(counts: np.ndarray, margin: float, max_foreign: int) -> None:
    """The plan of `counts` against `_reference_plan`, and its guarantees on the loads."""
    shards, num_experts = counts.shape
    local = num_experts // shards
    plan = jax.tree.map(np.asarray, _jit_plan(counts, margin=margin, max_foreign=max_foreign))
    cap, worker, borrowed, overflow = _reference_plan(counts, margin, max_foreign)

    assert int(plan.cap) == cap
    assert cap <= np.ceil((1 + margin) * counts.sum() / shards - 1e-9) or counts.sum() == 0
    assert _plan_workers(plan, counts) == worker
    for shard in range(shards):
        slots = list(borrowed[shard]) + [num_experts] * (max_foreign - len(borrowed[shard]))
        assert plan.borrowed_expert[shard].tolist() == slots

    traffic = np.zeros((shards, shards, local + max_foreign), np.int64)
    for (expert, source, _), shard in worker.items():
        owner = expert // local
        group = expert % local if shard == owner else local + borrowed[shard].index(expert)
        traffic[source, shard, group] += 1
    np.testing.assert_array_equal(plan.traffic, traffic)

    loads = plan.traffic.sum(axis=(0, 2))
    plain = np.asarray(expert_parallel.plain_loads(counts))
    assert loads.sum() == counts.sum(), "every row is computed once"
    np.testing.assert_array_equal(plan.traffic.sum(axis=(1, 2)), counts.sum(axis=1))
    assert np.all(loads <= np.maximum(cap, plain)), "no shard computes more than without LLEP"
    borrowers = (plan.borrowed_expert < num_experts).any(axis=1)
    assert np.all(loads[borrowers] <= cap)
    if not overflow:
        assert np.all(loads <= cap)


def test_enough_slots_keep_every_load_within_the_cap():
    """max_foreign >= experts - experts per shard: no run can overflow its slots."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.zipf(1.5, size=(4, 12)).clip(0, 500).astype(np.int32)
        plan = _jit_plan(counts, margin=0.0, max_foreign=12 - 3)
        assert int(plan.loads.max()) <= int(plan.cap) == -(-int(counts.sum()) // 4)


# The dispatch on a mesh.


def _routing(kind: str, seed: int = 0, zipf_s: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """expert_index and combine_weights [tokens, top_k], distinct experts per token:

    "one_shard": every choice is expert 0 or 1 (both on the first expert shard whenever shards
      hold two or more experts);
    "zipf": experts drawn from a Zipf law with exponent `zipf_s` (0 is uniform).
    """
    rng = np.random.default_rng(seed)
    if kind == "one_shard":
        first = rng.integers(0, 2, TOKENS)
        index = np.stack([first, 1 - first], axis=1)
    else:
        probs = 1.0 / np.arange(1, NUM_EXPERTS + 1) ** zipf_s
        index = np.stack(
            [
                rng.choice(NUM_EXPERTS, TOP_K, replace=False, p=probs / probs.sum())
                for _ in range(TOKENS)
            ]
        )
    weights = rng.dirichlet(np.ones(TOP_K), TOKENS)
    return index.astype(np.int32), weights.astype(np.float32)


def _inputs():
    params = moe.init_expert_params(jax.random.key(0), NUM_EXPERTS, D_MODEL, D_FF)
    x = jax.random.normal(jax.random.key(1), (TOKENS, D_MODEL))
    return x, params


def _dense_reference(x, params, weights, index) -> np.ndarray:
    """y [tokens, d_model] in float64, every assignment's expert applied row by row."""
    x = np.asarray(x, np.float64)
    w = {name: np.asarray(value, np.float64) for name, value in params.items()}
    y = np.zeros_like(x)
    for k in range(TOP_K):
        expert = index[:, k]
        gate = np.einsum("td,tdf->tf", x, w["w_gate"][expert])
        up = np.einsum("td,tdf->tf", x, w["w_up"][expert])
        hidden = gate / (1 + np.exp(-gate)) * up
        y += weights[:, k, None] * np.einsum("tf,tfd->td", hidden, w["w_down"][expert])
    return y


def _loss(x, params, weights, index, strategy, options):
    routing = Routing(expert_index=index, combine_weights=weights, router_probs=None, aux_losses={})
    mesh = sharding.kernel_mesh()
    y = moe.moe_ffn(x, routing, params, strategy=strategy, options=options, mesh=mesh).y
    probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
    return jnp.sum(y * probe), y


def _step(shape, strategy: str, options: moe.DispatchOptions | None):
    """`value_and_grad` of `_loss` in x, the expert weights and the combine weights, jitted with
    the step's shardings under a mesh of `shape`; and the mesh."""
    mesh = mesh_of(shape)
    tokens, weight_shardings = step_shardings(mesh)
    step = jax.value_and_grad(
        functools.partial(_loss, strategy=strategy, options=options),
        argnums=(0, 1, 2),
        has_aux=True,
    )
    return jax.jit(step, in_shardings=(tokens, weight_shardings, tokens, tokens)), mesh


# One jitted step per (mesh, strategy, options), traced and compiled once for every test and
# drawn routing that runs it.
_compiled = functools.cache(_step)


def _run(shape, x, params, weights, index, strategy, **options):
    """The step of `strategy` with `options`; with none, moe_ffn gets the name alone and the
    strategy's default options."""
    chosen = moe.get(strategy).options(**options) if options else None
    # A ragged exchange traces the test's emulated ragged_all_to_all: its step is not kept.
    fn, mesh = (_step if options.get("exchange") == "ragged" else _compiled)(
        shape, strategy, chosen
    )
    with jax.set_mesh(mesh):
        return fn(x, params, weights, index)


@functools.cache
def _loads_fn(shape, margin: float, max_foreign: int):
    mesh = mesh_of(shape)

    def both(index):
        count = functools.partial(
            expert_parallel.shard_loads, index, num_experts=NUM_EXPERTS, mesh=mesh
        )
        return count(balance=llep.llep_balance(margin, max_foreign)), count()

    return jax.jit(both), mesh


def _loads(shape, index, margin: float, max_foreign: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows each expert shard computes with LLEP's (margin, max_foreign), and plain: [data
    * fsdp, shards] each."""
    fn, mesh = _loads_fn(shape, margin, max_foreign)
    with jax.set_mesh(mesh):
        return jax.tree.map(np.asarray, fn(jnp.asarray(index)))


def _assert_same_as_plain(actual, expected):
    chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-5)


def _check_llep(shape, index, weights, **options):
    """LLEP with `options` (none: the defaults its name brings) equals plain expert parallelism
    and the float64 reference."""
    x, params = _inputs()
    expected = _run(shape, x, params, weights, index, "expert_parallel", exchange="padded")
    actual = _run(shape, x, params, weights, index, "llep", **options)
    _assert_same_as_plain(actual, expected)
    (_, y), _ = actual
    np.testing.assert_allclose(y, _dense_reference(x, params, weights, index), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["one_shard", "zipf"])
def test_llep_equals_plain_expert_parallelism_and_balances(shape, kind):
    index, weights = _routing(kind)
    shards = shape[2]
    _check_llep(shape, index, weights, exchange="padded", margin=MARGIN, max_foreign=NUM_EXPERTS)
    loads, plain = _loads(shape, index, MARGIN, NUM_EXPERTS)
    mean = plain.sum(axis=1, keepdims=True) / shards
    assert np.all(plain.max(axis=1) >= 1.5 * mean[:, 0]), "the routing must be skewed"
    np.testing.assert_array_equal(loads.sum(axis=1), plain.sum(axis=1))
    assert np.all(loads <= np.ceil((1 + MARGIN) * mean)), (loads, plain)


def test_too_few_slots_fall_back_to_the_owner():
    """With one slot a run that spans two experts leaves the second with its owner: loads above
    the cap, but never above plain expert parallelism's, and the same outputs."""
    shape = (1, 1, 8, 1)
    index, weights = _routing("zipf", seed=3, zipf_s=2.5)
    _check_llep(shape, index, weights, exchange="padded", margin=MARGIN, max_foreign=1)
    loads, plain = _loads(shape, index, MARGIN, 1)
    cap = llep.load_cap(TOKENS * TOP_K, 8, MARGIN)
    assert loads.max() > cap, "this routing should need more than one slot somewhere"
    assert loads.max() < plain.max()


@pytest.mark.parametrize("shape", [(1, 2, 4, 1), (2, 1, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_llep_ragged_exchange_offsets(shape, monkeypatch):
    """The TPU/GPU exchange with LLEP's traffic, through an emulated ragged_all_to_all, against
    plain expert parallelism over the padded exchange (tests/moe/test_expert_parallel.py checks
    plain expert parallelism's ragged exchange)."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    index, weights = _routing("zipf", seed=1)
    _check_llep(shape, index, weights, exchange="ragged", margin=MARGIN, max_foreign=2)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), zipf_s=st.sampled_from([0.0, 1.2, 2.0, 3.0]))
def test_llep_equals_plain_on_drawn_routing(seed, zipf_s):
    """With the options the name "llep" brings: its default margin and few slots."""
    shape = (1, 1, 8, 1)
    index, weights = _routing("zipf", seed=seed, zipf_s=zipf_s)
    _check_llep(shape, index, weights)
    defaults = llep.LLEPOptions()
    loads, plain = _loads(shape, index, defaults.margin, defaults.max_foreign)
    cap = int(llep.load_cap(TOKENS * TOP_K, 8, defaults.margin))
    assert loads.max() <= max(cap, plain.max())


def test_moe_ffn_runs_llep_by_name():
    """moe_ffn given the name "llep" and no options runs LLEP with its defaults (the step the
    drawn-routing test runs too)."""
    index, weights = _routing("one_shard")
    _check_llep((1, 1, 8, 1), index, weights)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("exchange", "fast", "options.exchange: got 'fast'; allowed: auto, ragged, padded"),
        ("margin", -0.5, "model.moe.dispatch.options.margin: got -0.5; allowed: >= 0"),
        ("max_foreign", 0, "model.moe.dispatch.options.max_foreign: got 0; allowed: an int >= 1"),
    ],
)
def test_config_rejects_bad_llep_options(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DispatchConfig.of("llep", **{field: value})


def test_llep_balance_rejects_bad_options():
    with pytest.raises(ValueError, match="max_foreign: got 0; allowed: an int >= 1"):
        llep.llep_balance(0.1, 0)
    with pytest.raises(ValueError, match="margin: got -1.0; allowed: >= 0"):
        llep.llep_balance(-1.0, 2)


def test_model_config_reaches_the_dispatch(monkeypatch):
    """`model.moe.dispatch` names llep and its options reach the plan from the language model,
    whose logits are those of plain expert parallelism."""
    balances, plans = [], []
    dispatch, balance_of = _sharded.sharded_dropless, llep.llep_balance

    def recording(*args, **kwargs):
        balances.append(kwargs["balance"] is _sharded.PLAIN)
        return dispatch(*args, **kwargs)

    def recording_balance(margin, max_foreign):
        plans.append((margin, max_foreign))
        return balance_of(margin, max_foreign)

    monkeypatch.setattr(_sharded, "sharded_dropless", recording)
    monkeypatch.setattr(llep, "llep_balance", recording_balance)
    tiny = load_config_file(Path(__file__).resolve().parents[2] / "configs" / "tiny.py").model
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 256, jnp.int32)
    logits = {}
    choices = {
        "expert_parallel": {},
        "llep": {"moe.dispatch.options.margin": 0.25, "moe.dispatch.options.max_foreign": 3},
    }
    for name, options in choices.items():
        config = with_fields(tiny, {"num_layers": 1, "moe.dispatch.name": name, **options})
        graph, state = nnx.split(TransformerLM(config, rngs=nnx.Rngs(0)))
        forward = jax.jit(lambda state, tokens, graph=graph: nnx.merge(graph, state)(tokens)[0])
        with jax.set_mesh(mesh_of((2, 1, 4, 1))):
            logits[name] = forward(state, tokens)
    assert balances == [True, False]
    assert plans == [(0.25, 3)]
    np.testing.assert_allclose(logits["llep"], logits["expert_parallel"], rtol=2e-5, atol=2e-5)
