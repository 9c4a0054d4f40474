"""The one base class of the errors a user fixes by changing what they asked for."""


class UserError(ValueError):
    """Input that cannot work: a config value, a workdir, a checkpoint choice. The message names
    the file or field, the value and what is allowed; `train.py` and `eval.py` print it and exit
    with status 2, without a traceback."""

    label = "error"
