"""Synthetic tasks for sparse-attention studies (multi-query associative recall)."""
