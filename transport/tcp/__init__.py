"""``tcp://host:port``: pure-Python transport over parallel TCP connections (see transport.tcp.transport)."""
