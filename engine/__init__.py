"""Ferry engine: everything that decides."""
