"""Programs built on the library: synthetic tasks for sparse-attention studies (multi-query
associative recall, `mqar*`) and the lottery-ticket experiment (`lottery`, which `train.py`
runs for a config file declaring `TASK = "lottery"`)."""
