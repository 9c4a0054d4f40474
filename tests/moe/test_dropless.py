"""The "dropless" strategy (`moejax.moe.dropless`) on one device; over a mesh's data axes in
tests/moe/test_expert_parallel.py."""

import jax
import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.moe import DroplessOptions, dropless_dispatch
from tests.moe.dispatch_helpers import loop_reference, problem


def test_dropless_dispatch_jits_with_xla_gmm() -> None:
    x, routing, params = problem(10, 3, 2, 4, 6, seed=11)
    y, dropped_fraction = jax.jit(dropless_dispatch, static_argnames="gmm_impl")(
        x, routing, params, gmm_impl="xla"
    )
    expected = loop_reference(x, routing.expert_index, routing.combine_weights, params)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert float(dropped_fraction) == 0.0


def test_unknown_gmm_impl_is_refused() -> None:
    x, routing, params = problem(4, 2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"impl: unknown value 'cuda'"):
        dropless_dispatch(x, routing, params, gmm_impl="cuda")
    with pytest.raises(
        ConfigError, match=r"model.moe.dispatch.options.gmm_impl: got 'cuda'; allowed: auto, "
    ):
        DroplessOptions(gmm_impl="cuda")
