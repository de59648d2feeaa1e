"""The demo against a stack that is already running (``tuneshield demo --url URL``).

Everything goes through the gateway's HTTP API with the operator's admin key, as the
in-process ``DemoStack`` does through the gateway's own objects: the demo's chats, healing
and evaluation under one key it creates (opted out, so the running learner never trains
on the simulated attacks), adapters registered with ``POST /admin/adapters`` and served
with ``/promote``, logged turns exported with ``POST /admin/dialogs/export``. The stack
must run on this machine (or share its file system): the gateway copies the adapter
folders the demo trains, and the demo reads the registered folders for perplexity. When
the demo ends, its key is revoked and its dialogs are deleted; its aliases and adapter
versions stay registered, for a later run to start from.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from gateway import engine_error_message
from simulation.stack import HEAL_TIMEOUT_S, Stack, StackError

if TYPE_CHECKING:
    import pyarrow as pa

    from gateway import GatewaySettings
    from tuneshield import OpenAIChat

logger = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 600.0
KEY_NAME = "tuneshield-demo"


class RemoteStack(Stack):
    """A running gateway (``tuneshield serve``) used by the demo; a context manager.

    ``url`` is the gateway's root (``http://127.0.0.1:8080``); ``admin_key`` one of its
    admin keys. ``aliases`` get an identity adapter ``<alias>-v0000`` when they have none.
    """

    def __init__(
        self,
        url: str,
        admin_key: str,
        model_path: str,
        data_dir: Path,
        aliases: Sequence[str],
        *,
        rate_limit_per_minute: float | None = None,
        announce: Callable[[str], None] = logger.info,
        transport: httpx.BaseTransport | None = None,
        **ignored: Any,
    ) -> None:
        from gateway import load_settings

        self.url = url.rstrip("/")
        self.model_path = model_path
        self.data_dir = Path(data_dir)
        self.aliases = list(aliases)
        self.rate_limit_per_minute = rate_limit_per_minute
        self.announce = announce
        # Header names and flush timing: the running gateway reads the same policies.
        self.settings: GatewaySettings = load_settings(
            upstream_url=self.url, data_dir=self.data_dir, environ={}
        )
        self._admin = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=httpx.Timeout(ADMIN_TIMEOUT_S, connect=10.0),
            transport=transport,
        )
        self._key: dict[str, Any] | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def gateway_url(self) -> str:
        """The OpenAI base URL users call."""
        return f"{self.url}/v1"

    @property
    def api_key(self) -> str:
        """The demo's own key (created by ``start``)."""
        if self._key is None:
            raise StackError("the demo's key does not exist yet: start the stack first")
        return str(self._key["key"])

    def start(self) -> None:
        """Check the gateway and the admin key, make the demo's key and identity adapters."""
        self.announce(f"using the running stack at {self.url}")
        try:
            health = self._admin.get("/healthz")
        except httpx.HTTPError as error:
            raise StackError(f"no gateway answers at {self.url}: {error}") from None
        if health.status_code != 200:
            raise StackError(f"the gateway at {self.url} is not healthy: {health.text[:300]}")
        self._json("GET", "/admin/aliases")  # the admin key works, or a clear error
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._key = self._json(
            "POST",
            "/admin/keys",
            json={
                "name": KEY_NAME,
                "role": "user",
                "opt_out": True,
                "rate_limit_per_minute": self.rate_limit_per_minute,
            },
        )
        for alias in self.aliases:
            self._ensure_identity(alias)

    def stop(self) -> None:
        """Delete the demo's dialogs and revoke its key (idempotent)."""
        key, self._key = self._key, None
        if key is not None:
            key_id = key["key_id"]
            try:
                self._json("DELETE", "/admin/dialogs", params={"key_id": key_id})
                self._json("DELETE", f"/admin/keys/{key_id}")
            except StackError as error:
                self.announce(f"[yellow]could not clean up the demo's key {key_id}: {error}")
        self._admin.close()

    # ------------------------------------------------------------------ the API

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An admin call's response; a failed exchange or an error answer is a StackError."""
        try:
            response = self._admin.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise StackError(f"{method} {path} failed: {error}") from None
        if response.status_code >= 400:
            message = engine_error_message(response.content) or response.text[:300]
            raise StackError(f"{method} {path} answered {response.status_code}: {message}")
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _ensure_identity(self, alias: str) -> None:
        from engine import identity_version
        from tuneshield import make_identity_adapter

        version = identity_version(alias)
        known = {
            row["version"] for row in self._json("GET", "/admin/adapters", params={"alias": alias})
        }
        if version not in known:
            if known:
                raise StackError(f"alias {alias!r} has versions but no {version}: {sorted(known)}")
            with tempfile.TemporaryDirectory(dir=self.data_dir) as scratch:
                folder = Path(scratch) / version
                make_identity_adapter(self.model_path, folder)
                registered = self.install(alias, folder, hyperparameters={"kind": "identity"})
            if registered != version:
                raise StackError(f"the gateway registered {registered}, expected {version}")
        if self.active_version(alias) is None:
            self.activate(version)

    def active_version(self, alias: str) -> str | None:
        """The version ``alias`` serves now (None: no such alias yet)."""
        for row in self._json("GET", "/admin/aliases"):
            if row["alias"] == alias:
                return str(row["adapter"])
        return None

    def activate(self, version: str) -> dict[str, Any]:
        """Hot-swap ``version`` in under its alias; the swap's record."""
        result: dict[str, Any] = self._json("POST", f"/admin/adapters/{version}/promote")
        return result

    def adapter_path(self, version: str) -> Path:
        """The folder of a registered version (on the gateway's machine)."""
        return Path(self._json("GET", f"/admin/adapters/{version}")["path"])

    def install(self, alias: str, built: Path, **metadata: Any) -> str:
        """Register a copy of a finished adapter folder as ``alias``'s next version."""
        body = {"alias": alias, "path": str(Path(built).resolve()), **metadata}
        return str(self._json("POST", "/admin/adapters", json=body)["version"])

    def healer(self, concurrency: int) -> OpenAIChat:
        """Contextual healing through the gateway, on the baseline's identity adapter."""
        from tuneshield import OpenAIChat

        return OpenAIChat(
            self.gateway_url,
            self.aliases[0],
            api_key=self.api_key,
            timeout_s=HEAL_TIMEOUT_S,
            concurrency=concurrency,
            headers={self.settings.routing.opt_out_header: "1"},
        )

    def _turns(self, conversation_ids: Collection[str]) -> pa.Table:
        import pyarrow.parquet as pq

        body = {"conversation_ids": sorted(conversation_ids), "include_opt_out": True}
        response = self._request("POST", "/admin/dialogs/export", json=body)
        return pq.read_table(io.BytesIO(response.content))
