"""``shm://name``: same-host zero-copy transport (see transport.shm.transport)."""
