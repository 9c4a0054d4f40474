"""QuantMoE-Bench's structure-aware bit widths: shared experts and the router above routed
experts, the most chosen routed experts promoted."""

import numpy as np
import pytest

from moejax.quantization import bit_allocation


def test_shared_experts_and_router_get_more_bits_than_routed_experts():
    bits = bit_allocation(4)
    assert (bits.shared, bits.router, bits.routed) == (8, 8, (4, 4, 4, 4))
    assert bits.bits_of("shared_w_down") == 8 and bits.bits_of("w_up") == (4, 4, 4, 4)
    assert bit_allocation(4, router=None).bits_of("router") is None


def test_the_most_chosen_experts_get_the_frequent_bits():
    counts = np.array([5, 90, 10, 40, 40, 1])
    bits = bit_allocation(6, routed=3, expert_counts=counts, frequent_share=0.5)
    assert bits.routed == (3, 4, 3, 4, 4, 3)  # experts 1, 3, 4; ties to the lower index
    bits = bit_allocation(6, expert_counts=counts, frequent_share=1 / 6, frequent_bits=8)
    assert bits.routed == (4, 8, 4, 4, 4, 4)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shared": 9}, "shared"),
        ({"routed": 1}, "routed"),
        ({"router": 0}, "router"),
        ({"frequent_share": 0.5}, "expert_counts"),
        ({"frequent_share": 1.5}, "frequent_share"),
        (
            {"frequent_share": 0.5, "expert_counts": np.ones(4), "frequent_bits": 12},
            "frequent_bits",
        ),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        bit_allocation(4, **kwargs)
