"""The simulation harness: the attack demo, the offline research experiment and the
loopback helpers that benchmarks and end-to-end tests use to start real servers.

Not a production package: it drives the real stack (``gateway``, ``engine``, ``learner``,
``store``) through their public APIs or their HTTP API, never the other way round.

``tuneshield demo`` / ``simulate``: attackers and benign users chat through the real stack;
arms learn. Modules: ``users`` (simulated users and their ground truth), ``traffic`` (the
chats, through the gateway with the ``openai`` client), ``arms`` (who learns what),
``stack`` (engine + gateway in this process), ``remote`` (a gateway already running),
``measure`` (held-out probes through the gateway), ``runner`` (rounds), ``report`` (the
demo's and the experiment's report folders), ``cli`` (the ``demo``, ``simulate`` and
``experiment`` verbs). ``experiment``: the offline arms experiment (``tuneshield
experiment``). ``loopback``: a free port, waiting until a server answers; ``scripts``: a
benchmark script loaded as a module.
"""
