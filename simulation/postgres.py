"""A throwaway PostgreSQL server on loopback, for tests and benchmarks.

Debian's binaries (``initdb``, ``pg_ctl``) make a cluster in a temporary folder, listening
on 127.0.0.1 only, on a free port, with trust authentication; it is removed when the
server stops. The server keeps ``fsync`` on: durability tests depend on real commits.
PostgreSQL refuses to run as root, so as root the binaries run as the ``postgres`` user
(created if missing), which then owns the cluster's folder and is the connection user.

    with PostgresServer() as server:          # initdb + start + CREATE DATABASE tuneshield
        psycopg.connect(server.url)           # postgresql://<user>@127.0.0.1:<port>/tuneshield
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

PG_BIN_ENV = "PG_BIN"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
SERVICE_USER = "postgres"
DATABASE = "tuneshield"
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed."""


def find_bin_dir() -> Path:
    """``$PG_BIN``, or the newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb``."""
    if os.environ.get(PG_BIN_ENV):
        folder = Path(os.environ[PG_BIN_ENV])
        if not (folder / "initdb").is_file():
            raise PostgresUnavailable(
                f"${PG_BIN_ENV}={folder} has no initdb: point it at PostgreSQL's bin folder, "
                "or unset it after `bash deploy/install.sh --dev` installs postgresql"
            )
        return folder
    candidates = sorted(
        (path.parent for path in DEBIAN_PG_ROOT.glob("*/bin/initdb")),
        key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise PostgresUnavailable(
            "PostgreSQL's server is not installed (no initdb under /usr/lib/postgresql): "
            "`bash deploy/install.sh --dev` installs it"
        )
    return candidates[-1]


def _ensure_service_user() -> None:
    """As root: the ``postgres`` OS user that Debian's package creates; made if missing."""
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", SERVICE_USER],
            check=True,
            capture_output=True,
        )


def _make_traversable(folder: Path) -> None:
    """Let other users pass through ``folder``'s parents (``o+x``: enter, not list).

    pytest's temporary folders sit under a root-only ``/tmp/pytest-of-root``; the
    ``postgres`` user must reach its cluster through them.
    """
    for parent in folder.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster of its own; ``url`` names its ``tuneshield`` database."""

    def __init__(self, root: Path | None = None, *, port: int | None = None) -> None:
        self._bin = find_bin_dir()
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="pg-"))
        self.port = port or _free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            _ensure_service_user()
        self.user = SERVICE_USER if self._as_root else pwd.getpwuid(os.geteuid()).pw_name
        self._running = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """The ``tuneshield`` database of this server."""
        return self.database_url(DATABASE)

    def database_url(self, name: str) -> str:
        """Another database on this server."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def _run(self, args: Sequence[str]) -> None:
        command = [str(self._bin / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        # cwd: the service user may not be allowed into the caller's working folder.
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=self.root)
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
                + (f"\nserver log ({self.log_path}):\n{log[-2000:]}" if log else "")
            )

    def start(self) -> None:
        """Create the cluster (first start only), start it, create the database."""
        if self._running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            _make_traversable(self.root)
            shutil.chown(self.root, SERVICE_USER, SERVICE_USER)
            self.root.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(["initdb", "-D", str(self.data_dir), "-A", "trust", "-U", self.user,
                       "--no-sync", "-E", "UTF8"])  # fmt: skip
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(["pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.log_path),
                   "-w", "-t", str(START_TIMEOUT_S), "start"])  # fmt: skip
        self._running = True
        self.create_database(DATABASE)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if absent) and return its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.database_url("postgres"), autocommit=True) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [name]
            ).fetchone()
            if exists is None:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, closing its connections."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.database_url("postgres"), autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as after a crash, no shutdown checkpoint)."""
        if not self._running:
            return
        self._run(["pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop"])
        self._running = False

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            self._remove_own_root()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self._remove_own_root()

    def _remove_own_root(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
