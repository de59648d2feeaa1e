"""``tuneshield demo``: attackers and benign users chat through the real stack; arms learn.

Modules: ``users`` (simulated users and their ground truth), ``traffic`` (the chats,
through the gateway with the ``openai`` client), ``arms`` (who learns what), ``stack``
(engine + gateway in this process), ``measure`` (held-out probes through the gateway),
``runner`` (rounds), ``report`` (report folder), ``cli``.
"""
