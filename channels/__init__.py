"""Ferry channels: everything that moves bytes."""
