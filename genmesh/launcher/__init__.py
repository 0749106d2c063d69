"""``genmesh up``: the whole mesh as separate local processes, supervised."""
