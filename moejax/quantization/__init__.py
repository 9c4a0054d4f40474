"""Post-training quantisation math for MoE weights (floor 2: pure functions, no model, no
config): per-group integer fake quantisation with a straight-through gradient (`fake_quant`),
GPTQ rounding with error feedback (`gptq`), EAQuant's expert-aware smoothing, router alignment
and balanced calibration (`eaquant`), QuantMoE-Bench's structure-aware bit widths
(`mixed_precision`), GQSA's group sparsity with group quantisation (`gqsa`) and the router's
top-k agreement before and after (`agreement`). A model-level driver applies them layer by
layer.
"""

from moejax.quantization.agreement import topk_agreement
from moejax.quantization.eaquant import (
    SMOOTHED_VECTORS,
    SMOOTHED_WEIGHTS,
    align_router,
    balanced_calibration,
    channel_absmax,
    expert_aware_smoothing,
    router_kl,
    smooth_moe_weights,
    smoothing_scales,
)
from moejax.quantization.fake_quant import (
    QuantizedWeight,
    check_quantization,
    dequantize,
    fake_quant,
    fake_quant_activations,
    quantize,
)
from moejax.quantization.gptq import gptq_quantize
from moejax.quantization.gqsa import gqsa, group_scores
from moejax.quantization.mixed_precision import BitAllocation, bit_allocation

__all__ = [
    "SMOOTHED_VECTORS",
    "SMOOTHED_WEIGHTS",
    "BitAllocation",
    "QuantizedWeight",
    "align_router",
    "balanced_calibration",
    "bit_allocation",
    "channel_absmax",
    "check_quantization",
    "dequantize",
    "expert_aware_smoothing",
    "fake_quant",
    "fake_quant_activations",
    "gptq_quantize",
    "gqsa",
    "group_scores",
    "quantize",
    "router_kl",
    "smooth_moe_weights",
    "smoothing_scales",
    "topk_agreement",
]
