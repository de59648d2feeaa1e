"""The simulation harness: the attack demo, the offline research experiment and the
loopback helpers that benchmarks and end-to-end tests use to start real servers.

Not a production package: it drives the real stack (``gateway``, ``engine``, ``learner``,
``store``) through their public APIs or their HTTP API, never the other way round.
"""
