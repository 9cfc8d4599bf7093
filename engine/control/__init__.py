"""Ferry's control plane: QMP-shaped verbs over ZeroMQ, msgpack bodies.

- ``protocol``: request/reply/event encoding and verb schemas (pure, no sockets).
- ``endpoints``: control endpoint rules (loopback or not, where the event stream is).
- ``auth``: CURVE key pairs and how server and client sockets use them.
- ``server``: the asyncio ROUTER (requests) + XPUB (events) server of a worker.
- ``client``: an asyncio client with request ids and event subscription.
- ``spawn``: start worker processes locally (demo, tests).
- ``driver``: run one migration between two workers through their control planes.
- ``report``: the human-readable migration report.
- ``progress``: the live progress display (remaining, dirty rate, expected downtime, ETA).
- ``qmp``: the optional QMP listener of a worker (QEMU Machine Protocol on a Unix socket or
  loopback TCP), for qmp-shell and QEMU's ``qemu.qmp`` library.
"""
