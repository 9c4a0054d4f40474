"""moejax: routed experts, sparse attention and masked pruning in JAX / Flax NNX."""

# First, before anything imports JAX: glibc malloc settings that XLA:CPU's per-step temporaries
# need (moejax/allocator.py; MOEJAX_MALLOC_TUNING=0 keeps glibc's defaults).
from moejax.allocator import tune_malloc

MALLOC_TUNING = tune_malloc()

# Importing the router zoo registers every router by name, so a config string finds it.
from moejax import routers  # noqa: E402, F401
