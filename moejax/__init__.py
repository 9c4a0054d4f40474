"""moejax: routed experts, sparse attention and masked pruning in JAX / Flax NNX."""

# Importing the router zoo registers every router by name, so a config string finds it.
from moejax import routers  # noqa: F401
