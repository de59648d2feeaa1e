"""Helpers of the console's in-process tests: signing in and reading a page's CSRF token."""

from __future__ import annotations

import re

import httpx
from console_stack import ADMIN_KEY
from litestar import Litestar
from litestar.testing import AsyncTestClient

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_token(page: httpx.Response) -> str:
    """The CSRF token in a page's forms."""
    found = CSRF.search(page.text)
    assert found is not None, page.text
    return found.group(1)


async def sign_in(client: AsyncTestClient[Litestar], key: str = ADMIN_KEY) -> httpx.Response:
    """Post the sign-in form as a browser does (its token from the form), unfollowed."""
    form = await client.get("/console/sign-in")
    return await client.post(
        "/console/sign-in",
        data={"key": key, "csrf_token": csrf_token(form)},
        follow_redirects=False,
    )


async def signed_in_token(client: AsyncTestClient[Litestar]) -> str:
    """Sign in with the admin key; the session's CSRF token (from the overview's forms)."""
    assert (await sign_in(client)).status_code == 303
    return csrf_token(await client.get("/console/"))
