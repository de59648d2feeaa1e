"""The operator console: server-rendered pages at ``/console`` for admins.

Sign in with an admin key; see each alias and what it serves, this gateway's traffic,
errors and live toxicity; the adapters' lineage and gate figures, with promote and
rollback; learning rounds; API keys; the audit log. Every figure and every action goes
through the admin API the CLI uses (called in process, with the operator's own key);
the console adds nothing to the chat routes. Templates, styles and the vendored htmx
ship inside this package: nothing loads from another origin.
"""

from __future__ import annotations

from gateway.console._extension import Console

__all__ = ["Console"]
