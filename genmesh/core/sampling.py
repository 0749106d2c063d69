"""Sampling defaults every service must agree on."""

# max_tokens when a request leaves it 0 (see common.proto). The frontend reserves token
# budgets with it; the worker generates up to it.
DEFAULT_MAX_TOKENS = 128
