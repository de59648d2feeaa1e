"""Security cases tried black-box against the running app (issue #16, item 7): a malformed
header or body gets a 4xx in OpenAI's error shape before any work, never a 5xx; alias
names are checked wherever one comes in; registering an adapter folder reads regular
files only, never through a link, and only under the configured import root."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from gateway_fakes import ADMIN, ADMIN_KEY, chat_body
from learner_fakes import FakeVLLM, adapter_folder
from litestar import Litestar
from litestar.testing import AsyncTestClient

import store._registry as registry_module
from gateway import ADAPTER_VERSION_NAME, ALIAS_NAME
from gateway.app import create_app
from gateway.settings import GatewaySettings, load_settings
from learner.admin_routes import AdapterAdmin
from store import REQUIRED_FILES, AdapterImportRefused, AdapterRegistry, open_database

SECRET = "TUNESHIELD_ADMIN_KEY=do-not-leak-0123456789"
# JSON nested deeper than msgspec's decoder goes (it raised RecursionError: a 500).
DEEP = 1000
JSON = {"content-type": "application/json"}


@pytest.fixture
def settings(tmp_path: Path) -> GatewaySettings:
    return load_settings(
        upstream_url="http://engine.test",
        data_dir=tmp_path / "data",
        environ={"TUNESHIELD_ADMIN_KEY": ADMIN_KEY},
    )


@pytest.fixture
def engine() -> FakeVLLM:
    engine = FakeVLLM()
    engine.loaded["chat-v0000"] = "/adapters/chat-v0000"
    return engine


@pytest.fixture
async def client(
    settings: GatewaySettings, engine: FakeVLLM
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    app = create_app(settings, transport=engine.transport(), extensions=[AdapterAdmin()])
    async with AsyncTestClient(app=app) as test:
        yield test


@pytest.fixture
def imports(settings: GatewaySettings) -> Path:
    """The import root of policies/learner.yaml (``imports``, in the data dir)."""
    folder = settings.data_dir / "imports"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of an answer with ``status`` in OpenAI's shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return dict(error)


def chat_calls(engine: FakeVLLM) -> list[tuple[str, str]]:
    return [call for call in engine.calls if call[0] == "chat"]


# -- Headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer café".encode(),
        b"Bearer \xff\xfe",
        f"Bearer {ADMIN_KEY}é".encode(),
        b"",
        b"Bearer",
        b"Bearer " + b"k" * 100_000,
    ],
    ids=["non-ascii", "latin-1-bytes", "admin-key-plus-non-ascii", "empty", "bearer-alone", "huge"],
)
@pytest.mark.parametrize("route", ["/v1/models", "/admin/keys"])
async def test_bad_authorization_header_is_401_never_500(
    client: AsyncTestClient[Litestar], route: str, authorization: bytes
) -> None:
    """Non-ASCII bytes (once a TypeError in compare_digest: 500 on every route), an empty
    or bare scheme, a huge key: 401 in OpenAI's shape, on user and admin routes."""
    response = await client.get(route, headers={"Authorization": authorization})
    assert openai_error(response, 401)["type"] == "authentication_error"


async def test_two_authorization_headers_never_authenticate(
    client: AsyncTestClient[Litestar],
) -> None:
    """Two Authorization headers are read together (as HTTP combines repeated fields), so
    the admin key first and garbage second no longer passes as the admin key."""
    for pair in ([ADMIN["Authorization"], "Bearer nope"], ["Bearer nope", ADMIN["Authorization"]]):
        headers = [("Authorization", value) for value in pair]
        response = await client.get("/admin/keys", headers=headers)
        openai_error(response, 401)


@pytest.mark.parametrize("value", ["maybe", "2", "é".encode(), "y" * 10_000])
async def test_unreadable_opt_out_header_is_400_before_the_engine(
    client: AsyncTestClient[Litestar], engine: FakeVLLM, value: str | bytes
) -> None:
    """An opt-out header that says neither yes nor no was read as "no": the turn went to
    training data against the client's wish. Now 400 naming the header, engine untouched."""
    headers = {**ADMIN, "X-TuneShield-Opt-Out": value}
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert openai_error(response, 400)["param"] == "X-TuneShield-Opt-Out"
    assert chat_calls(engine) == []


@pytest.mark.parametrize("value", ["yes", "TRUE", "0", "off", ""])
async def test_opt_out_header_says_yes_or_no(client: AsyncTestClient[Litestar], value: str) -> None:
    """The documented yes/no spellings (and an empty header, "no") are served."""
    headers = {**ADMIN, "X-TuneShield-Opt-Out": value}
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("value", ["café".encode(), "../../etc", "a" * 129, "a b"])
async def test_bad_conversation_id_is_400_before_the_engine(
    client: AsyncTestClient[Litestar], engine: FakeVLLM, value: str | bytes
) -> None:
    """A conversation id outside its alphabet or length: 400 naming the header."""
    headers = {**ADMIN, "X-Conversation-Id": value}
    response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert openai_error(response, 400)["param"] == "X-Conversation-Id"
    assert chat_calls(engine) == []


# -- Bodies ---------------------------------------------------------------------------

BODY_ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/admin/keys"),
    ("POST", "/admin/dialogs/export"),
    ("PUT", "/admin/aliases/chat"),
    ("POST", "/admin/adapters"),
]


def nested(depth: int) -> bytes:
    """A chat request whose extra field nests ``depth`` arrays."""
    return (
        b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"x":'
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


@pytest.mark.parametrize(
    "body", [b"[" * DEEP + b"]" * DEEP, nested(DEEP), b'{"a":' * DEEP + b"1" + b"}" * DEEP]
)
@pytest.mark.parametrize(("method", "route"), BODY_ROUTES)
async def test_deeply_nested_json_is_400_not_500(
    client: AsyncTestClient[Litestar], engine: FakeVLLM, method: str, route: str, body: bytes
) -> None:
    """JSON nested a thousand levels deep (4 KB) was a RecursionError, a 500 with a
    traceback in the log; now 400 json_too_deep, and no engine call."""
    response = await client.request(method, route, content=body, headers={**ADMIN, **JSON})
    assert openai_error(response, 400)["code"] == "json_too_deep"
    assert engine.calls == []


async def test_moderately_nested_json_is_still_served(
    client: AsyncTestClient[Litestar],
) -> None:
    """Nesting the decoder reads (unknown fields are forwarded as they are) still works."""
    response = await client.post(
        "/v1/chat/completions", content=nested(100), headers={**ADMIN, **JSON}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "garbage"],
)
@pytest.mark.parametrize(("method", "route"), BODY_ROUTES)
async def test_body_that_is_not_declared_json_is_400(
    client: AsyncTestClient[Litestar],
    engine: FakeVLLM,
    method: str,
    route: str,
    content_type: str,
) -> None:
    """A body sent as a form or text was parsed as JSON anyway (and served); now 400
    naming Content-Type, before the engine is called."""
    headers = {**ADMIN, "content-type": content_type}
    response = await client.request(method, route, content=b'{"name": "x"}', headers=headers)
    error = openai_error(response, 400)
    assert (error["param"], error["code"]) == ("Content-Type", "unsupported_content_type")
    assert engine.calls == []


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8"])
async def test_json_without_or_with_parameters_in_its_content_type_is_read(
    client: AsyncTestClient[Litestar], content_type: str | None
) -> None:
    """No Content-Type at all, or application/json with a charset, is read as JSON."""
    headers = {**ADMIN, **({"content-type": content_type} if content_type else {})}
    body = b'{"model":"chat","messages":[{"role":"user","content":"hi"}]}'
    response = await client.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "no body"),
        (b"hello", "not valid JSON"),
        (b'{"model": "chat", "messages": [', "not valid JSON"),
        (b"[]", "object"),
        (b'"chat"', "object"),
        (b"null", "object"),
        (b'{"model":"chat","messages":[],"max_tokens":1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b'{"model":"chat","messages":[],"temperature":1e999}', "not valid JSON"),
        (b'{"model":"chat","messages":[{"role":"user","content":"\xff"}]}', "not valid JSON"),
    ],
    ids=["empty", "text", "truncated", "array", "string", "null", "huge-int", "inf", "utf-8"],
)
@pytest.mark.parametrize(("method", "route"), BODY_ROUTES)
async def test_unreadable_body_is_400_saying_what_is_wrong(
    client: AsyncTestClient[Litestar],
    engine: FakeVLLM,
    method: str,
    route: str,
    body: bytes,
    says: str,
) -> None:
    """Bodies that are not JSON, not an object, truncated, or hold numbers no JSON number
    type takes: 400 in OpenAI's shape (an empty one said "body: 'data'")."""
    response = await client.request(method, route, content=body, headers={**ADMIN, **JSON})
    assert says in openai_error(response, 400)["message"]
    assert engine.calls == []


async def test_unreadable_request_is_not_blamed_on_json(
    client: AsyncTestClient[Litestar],
) -> None:
    """A request Litestar cannot read for another reason (a bad Host header) is 400 without
    claiming the body was bad JSON."""
    response = await client.get("/v1/models", headers={**ADMIN, "Host": "é".encode()})
    assert "JSON" not in openai_error(response, 400)["message"]


# -- Alias names ----------------------------------------------------------------------

BAD_ALIASES = ["-x", ".hidden", "a:b", "a" * 65, "café", "chat\n", "a b"]


def test_one_alias_pattern_accepts_names_and_refuses_the_rest() -> None:
    """The one alias pattern: 1-64 letters, digits and . _ -, a letter or digit first; a
    version is an alias, -v and four or more digits."""
    for name in ["chat", "demo-baseline", "a.b_c", "A" * 64, "7"]:
        assert re.search(ALIAS_NAME, name), name
    for name in [*BAD_ALIASES, "", ".", "..", "a/b"]:
        assert not re.search(ALIAS_NAME, name), name
    assert re.search(ADAPTER_VERSION_NAME, "chat-v0007")
    for version in ["..-v0001", "-x-v0001", "chat-v01", "chat-v0001\n"]:
        assert not re.search(ADAPTER_VERSION_NAME, version), version


@pytest.mark.parametrize("alias", BAD_ALIASES)
async def test_alias_names_are_checked_wherever_they_come_in(
    client: AsyncTestClient[Litestar], engine: FakeVLLM, alias: str
) -> None:
    """PUT /admin/aliases/{alias}, the alias query of listing and rollback, a registered
    adapter's alias, an alias's history, a version to promote: 400 naming the field, and
    no alias is created ("-x" and "a:b" were)."""
    quoted = quote(alias, safe="")
    update = {"adapter": "chat-v0000"}
    answers = {
        "alias": [
            await client.put(f"/admin/aliases/{quoted}", json=update, headers=ADMIN),
            await client.get(f"/admin/aliases/{quoted}/history", headers=ADMIN),
            await client.get("/admin/adapters", params={"alias": alias}, headers=ADMIN),
            await client.post("/admin/adapters/rollback", params={"alias": alias}, headers=ADMIN),
            await client.post(
                "/admin/adapters", json={"alias": alias, "path": "/tmp"}, headers=ADMIN
            ),
        ],
        "version": [
            await client.post(f"/admin/adapters/{quoted}-v0001/promote", headers=ADMIN),
            await client.get(f"/admin/adapters/{quoted}-v0001", headers=ADMIN),
        ],
    }
    for field, responses in answers.items():
        for response in responses:
            assert openai_error(response, 400)["param"] == field, response.request.url
    aliases = (await client.get("/admin/aliases", headers=ADMIN)).json()
    assert [row["alias"] for row in aliases] == ["chat"]
    assert [call for call in engine.calls if call[0] != "chat"] == []


async def test_chat_model_need_only_name_an_existing_alias(
    client: AsyncTestClient[Litestar], engine: FakeVLLM
) -> None:
    """A chat request's model is looked up, not spelt out: any string that names no alias
    is 404 model_not_found, never a 5xx, and the engine is not called."""
    for model in ["..", "chat\n", "ch\x00at", "é" * 200]:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(model=model), headers=ADMIN
        )
        assert openai_error(response, 404)["code"] == "model_not_found", model
    assert chat_calls(engine) == []


# -- Adapter registration -------------------------------------------------------------


async def versions(client: AsyncTestClient[Litestar]) -> list[str]:
    rows = (await client.get("/admin/adapters", headers=ADMIN)).json()
    return [row["version"] for row in rows]


def leaked(data_dir: Path) -> list[Path]:
    """Files under the data dir that hold the secret."""
    return [
        path
        for path in data_dir.rglob("*")
        if path.is_file() and not path.is_symlink() and SECRET.encode() in path.read_bytes()
    ]


async def register(client: AsyncTestClient[Litestar], path: Path | str) -> httpx.Response:
    body = {"alias": "chat", "path": str(path)}
    return await client.post("/admin/adapters", json=body, headers=ADMIN)


def unsafe_folders(imports: Path, secret: Path) -> dict[str, Path]:
    """Adapter folders under the import root that must not be copied in, by what is wrong."""
    with_link = adapter_folder(imports, "with-link")
    (with_link / "notes.txt").symlink_to(secret)
    linked_weights = adapter_folder(imports, "linked-weights")
    (linked_weights / "adapter_model.safetensors").unlink()
    (linked_weights / "adapter_model.safetensors").symlink_to(secret)
    nested_link = adapter_folder(imports, "nested-link")
    (nested_link / "extra").mkdir()
    (nested_link / "extra" / "environ").symlink_to("/proc/self/environ")
    linked_folder = imports / "linked-folder"
    linked_folder.symlink_to(adapter_folder(imports, "real"))
    with_fifo = adapter_folder(imports, "with-fifo")
    os.mkfifo(with_fifo / "pipe")
    linked_subfolder = adapter_folder(imports, "linked-subfolder")
    (linked_subfolder / "sub").symlink_to(secret.parent)
    return {
        "link to a secret inside": with_link,
        "required file is a link": linked_weights,
        "link in a subfolder": nested_link,
        "the folder itself is a link": linked_folder,
        "fifo inside": with_fifo,
        "subfolder is a link": linked_subfolder,
    }


async def test_register_refuses_links_and_special_files_and_leaks_nothing(
    client: AsyncTestClient[Litestar], imports: Path, settings: GatewaySettings, tmp_path: Path
) -> None:
    """A folder holding a link (to a secret, to /proc/self/environ, to another folder), a
    folder that is itself a link, one holding a fifo: 403 naming path, nothing registered,
    no version number taken, the secret copied nowhere under the data dir. (A link was
    followed and its target copied under data/adapters, served back by the registry.)"""
    secret = tmp_path / "elsewhere" / "secret.env"
    secret.parent.mkdir()
    secret.write_text(SECRET)
    before = await versions(client)
    for why, folder in unsafe_folders(imports, secret).items():
        response = await register(client, folder)
        assert openai_error(response, 403)["param"] == "path", why
    assert await versions(client) == before
    assert leaked(settings.data_dir) == []
    assert not list((settings.data_dir / "adapters").glob(".*"))
    good = await register(client, adapter_folder(imports, "good"))
    assert good.status_code == 201, good.text
    assert good.json()["version"] == "chat-v0000"  # the refused ones took no number


async def test_register_reads_only_under_the_import_root(
    client: AsyncTestClient[Litestar], imports: Path, tmp_path: Path
) -> None:
    """A complete adapter folder outside the import root, reached directly or through
    ".." from inside it: 403 naming path; a path too long for the file system: 404 naming
    path (it was an OSError, a 500)."""
    outside = adapter_folder(tmp_path, "outside")
    for path, status in [
        (outside, 403),
        (f"{imports}/../../outside", 403),
        ("/" + "a" * 4000, 403),
        (f"{imports}/{'a' * 300}", 404),
    ]:
        response = await register(client, path)
        error = openai_error(response, status)
        assert error["param"] == "path", path
    refused = openai_error(await register(client, outside), 403)
    assert "outside the import root" in refused["message"]
    assert await versions(client) == []


async def test_register_copies_regular_files_and_folders_from_the_import_root(
    client: AsyncTestClient[Litestar], imports: Path
) -> None:
    """A folder with the adapter files, a README and a subfolder of regular files is
    copied whole; the copy holds no link."""
    source = adapter_folder(imports, "trained")
    (source / "README.md").write_text("trained on round 3")
    (source / "checkpoint").mkdir()
    (source / "checkpoint" / "state.json").write_text("{}")
    response = await register(client, source)
    assert response.status_code == 201, response.text
    copy = Path(response.json()["path"])
    copied = sorted(str(path.relative_to(copy)) for path in copy.rglob("*"))
    assert copied == sorted([*REQUIRED_FILES, "README.md", "checkpoint", "checkpoint/state.json"])
    assert not any(path.is_symlink() for path in copy.rglob("*"))
    assert (copy / "README.md").read_text() == "trained on round 3"


@pytest.mark.parametrize("swap_in", ["link", "fifo"])
def test_a_link_or_fifo_swapped_in_during_the_copy_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap_in: str
) -> None:
    """Between listing a folder and opening its file, the file is replaced by a link to a
    secret (or a fifo): the open does not follow it (O_NOFOLLOW) nor hang on it, the copy
    is refused and nothing is registered."""
    imports = tmp_path / "imports"
    source = adapter_folder(imports, "racy")
    secret = tmp_path / "secret.env"
    secret.write_text(SECRET)
    weights = source / "adapter_model.safetensors"
    real_open = registry_module._open_no_follow

    def swap_then_open(name: str, folder: int, flags: int, shown: Path) -> int:
        if name == weights.name:
            weights.unlink()
            if swap_in == "link":
                weights.symlink_to(secret)
            else:
                os.mkfifo(weights)
        return real_open(name, folder, flags, shown)

    monkeypatch.setattr(registry_module, "_open_no_follow", swap_then_open)
    database = open_database(str(tmp_path / "gateway.duckdb"))
    try:
        registry = AdapterRegistry(database)
        with pytest.raises(AdapterImportRefused, match=weights.name):
            registry.install_copy(source, tmp_path / "adapters", "chat", import_root=imports)
        assert registry.list() == []
    finally:
        database.close()
    assert leaked(tmp_path / "adapters") == [] and not list((tmp_path / "adapters").iterdir())
