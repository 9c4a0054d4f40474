"""Default job: a 4-layer mixture-of-experts byte-level language model on Shakespeare.

Sized to reach a useful model on 2 CPU cores in about ten minutes.
"""

from moejax.config import Config


def get_config() -> Config:
    return Config()
