"""The console in a real browser: Playwright driving Debian's Chromium (installed by
``deploy/install.sh --dev``) against a running gateway (uvicorn on loopback) with a fake
engine and a seeded store."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from console_stack import (
    ADMIN_KEY,
    END_USER,
    OTHER_END_USER,
    console_app,
    console_settings,
    fake_engine,
    seed_store,
)
from console_stack import serving_in_thread as serving

CHROMIUM = "/usr/bin/chromium"
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
NARROW, WIDE, HEIGHT = 390, 1280, 900
PAGES = (
    "/",
    "/adapters",
    "/canary",
    "/rounds",
    "/keys",
    "/quarantine",
    "/audit",
    "/adapters/chat-v0001/promote",
)
# How long a check waits for the page to change by itself (its refresh is 1 s here).
LIVE_WAIT_MS = 10_000

playwright_api = pytest.importorskip("playwright.sync_api")
if not shutil.which(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip(f"{CHROMIUM} is missing: run deploy/install.sh --dev", allow_module_level=True)

Browser = playwright_api.Browser
Page = playwright_api.Page
expect = playwright_api.expect


class Stack:
    """A running seeded gateway: its URL and the seeded user key."""

    def __init__(self, url: str, user_key: str) -> None:
        self.url = url
        self.console = f"{url}/console"
        self.user_key = user_key

    def chat_reply(self) -> str:
        """What /v1/chat/completions answers a user now (the fake names its adapter)."""
        headers = {"Authorization": f"Bearer {self.user_key}"}
        response = httpx.post(f"{self.url}/v1/chat/completions", json=CHAT, headers=headers)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    settings = console_settings(tmp_path / "data")
    user_key = seed_store(settings, tmp_path / "folders")
    with serving(console_app(settings, fake_engine())) as url:
        yield Stack(url, user_key)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": WIDE, "height": HEIGHT})
    yield context.new_page()
    context.close()


def sign_in(page: Page, stack: Stack, key: str = ADMIN_KEY) -> None:
    page.goto(f"{stack.console}/sign-in")
    page.get_by_label("Admin API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_operator_promotes_and_rolls_back(page: Page, stack: Stack) -> None:
    """Sign in, see the aliases, promote the candidate (confirmed), see /v1 answered by it,
    roll back (confirmed), and find both in the audit log under the operator's key id."""
    sign_in(page, stack)
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    aliases = page.locator("#overview-live .card")
    expect(aliases.filter(has_text="chat")).to_contain_text("serves chat-v0000")
    page.get_by_role("link", name="Adapters").click()
    page.locator("#chat-v0001").get_by_role("link", name="Promote…").click()
    expect(page.locator(".what")).to_contain_text(
        "Alias chat serves chat-v0000 now. After this, every request for chat is answered "
        "by chat-v0001"
    )
    page.get_by_role("button", name="Promote chat-v0001").click()
    expect(page.get_by_role("status")).to_contain_text("chat now serves chat-v0001")
    assert stack.chat_reply() == "from chat-v0001"
    page.get_by_role("link", name="Roll back chat…").click()
    expect(page.locator(".what")).to_contain_text("it serves chat-v0000 again")
    page.get_by_role("button", name="Roll back to chat-v0000").click()
    expect(page.get_by_role("status")).to_contain_text("chat rolled back: serves chat-v0000")
    assert stack.chat_reply() == "from chat-v0000"
    page.get_by_role("link", name="Audit").click()
    rows = page.locator("table.audit tbody tr")
    # Newest first, after the learner's seeded quarantine of an end user.
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text("rollback")
    expect(rows.nth(1)).to_contain_text("promote")
    expect(rows.nth(1)).to_contain_text("env-admin")
    expect(rows.nth(2)).to_contain_text("learner")
    page.get_by_label("Action").select_option("promote")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    expect(rows.nth(0)).to_contain_text("chat-v0001")


def test_operator_starts_and_aborts_a_canary(page: Page, stack: Stack) -> None:
    """From a candidate's "Canary…" button on the adapters page: the canary page shows
    the alias's latest canary (rolled back by the learner, with its tests), starts one for
    the chosen version (running, with its share), and aborts it with a reason (aborted,
    by the operator, and why)."""
    sign_in(page, stack)
    page.get_by_role("link", name="Adapters").click()
    page.locator("#chat-v0001").get_by_role("link", name=re.compile("^Canary")).click()
    live = page.locator("#canary-live")
    expect(live).to_contain_text("Latest canary chat-v0002")
    expect(live.locator(".canary-state")).to_have_text("rolled_back")
    expect(live.locator(".canary-test")).to_have_count(2)
    expect(live).to_contain_text("log likelihood ratio")
    expect(page.get_by_label("Candidate version")).to_have_value("chat-v0001")
    page.get_by_label("Share of conversations").fill("0.2")
    page.get_by_role("button", name="Start canary").click()
    expect(page.get_by_role("status")).to_contain_text("Canary chat-v0001 answers 20% of chat")
    expect(live).to_contain_text("Running canary chat-v0001")
    expect(live.locator(".canary-state")).to_have_text("running")
    expect(live).to_contain_text("20.0 % of the conversations to chat-v0001")
    page.get_by_label("Why abort").fill("seen enough")
    page.get_by_role("button", name="Abort canary of chat").click()
    expect(page.get_by_role("status")).to_contain_text("Canary chat-v0001 of chat aborted")
    expect(live.locator(".canary-state")).to_have_text("aborted")
    expect(live.locator(".decision")).to_contain_text("by env-admin: seen enough")
    expect(page.get_by_role("button", name="Abort canary of chat")).to_have_count(0)


def test_operator_quarantines_and_releases(page: Page, stack: Stack) -> None:
    """The quarantine page lists the learner's quarantine; a flagged end user's
    "Quarantine…" link fills the form, which quarantines it (listed with the operator and
    the reason); releasing it takes it off the list."""
    sign_in(page, stack)
    page.get_by_role("link", name="Quarantine").click()
    quarantined = page.locator("table.quarantined tbody tr")
    expect(quarantined).to_have_count(1)
    expect(quarantined.nth(0)).to_contain_text(OTHER_END_USER)
    expect(quarantined.nth(0)).to_contain_text("learner")
    page.locator("table.flagged").first.get_by_role(
        "link", name=re.compile(f"^Quarantine.*{END_USER}")
    ).click()
    expect(page.get_by_label("Key id or end user")).to_have_value(END_USER)
    expect(page.get_by_label("Kind")).to_have_value("user")
    page.get_by_label("Reason").fill("abusive prompts, ticket 12")
    page.get_by_role("button", name="Quarantine", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text(f"The user {END_USER} is quarantined")
    mine = quarantined.filter(has_text=END_USER)
    expect(mine).to_contain_text("abusive prompts, ticket 12")
    expect(mine).to_contain_text("env-admin")
    mine.get_by_role("button", name=re.compile("^Release")).click()
    expect(page.get_by_role("status")).to_contain_text(f"The user {END_USER} is released")
    expect(quarantined).to_have_count(1)
    expect(quarantined.filter(has_text=END_USER)).to_have_count(0)


def test_user_key_is_refused(page: Page, stack: Stack) -> None:
    """A user key stays on the sign-in page with the reason, and gets no session."""
    sign_in(page, stack, stack.user_key)
    expect(page.get_by_role("alert")).to_contain_text("That is a user key")
    assert page.url.endswith("/console/sign-in")
    cookies = {cookie["name"] for cookie in page.context.cookies()}
    assert "tuneshield_console" not in cookies
    page.goto(f"{stack.console}/adapters")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_action_without_csrf_token_is_refused(page: Page, stack: Stack) -> None:
    """A promote form whose CSRF token was taken out is refused and changes nothing, and
    so is a post from the signed-in browser that never had the token."""
    sign_in(page, stack)
    page.goto(f"{stack.console}/adapters/chat-v0001/promote")
    page.locator("form.buttons input[name=csrf_token]").evaluate("input => input.remove()")
    page.get_by_role("button", name="Promote chat-v0001").click()
    expect(page.get_by_role("heading", name="Action refused")).to_be_visible()
    forged = page.request.post(f"{stack.console}/adapters/chat-v0001/promote", form={})
    assert forged.status == 403
    assert stack.chat_reply() == "from chat-v0000"


def test_overview_updates_without_reloading(page: Page, stack: Stack) -> None:
    """A promote made elsewhere (the CLI's admin API) shows on an open overview by
    itself: the page is not reloaded, its live part is."""
    sign_in(page, stack)
    page.evaluate("window.notReloaded = true")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    httpx.post(f"{stack.url}/admin/adapters/chat-v0001/promote", headers=admin).raise_for_status()
    expect(page.locator("#overview-live .card")).to_contain_text(
        "serves chat-v0001", timeout=LIVE_WAIT_MS
    )
    assert page.evaluate("window.notReloaded") is True


def test_keyboard_sign_in_and_narrow_pages(page: Page, stack: Stack) -> None:
    """Signing in works from the keyboard alone (the labelled field has the focus, Enter
    sends it), a page's first Tab reaches the skip link, and at 390 px no page (a round's
    flagged samples included) is wider than the screen."""
    page.goto(f"{stack.console}/sign-in")
    expect(page.get_by_label("Admin API key")).to_be_focused()
    page.keyboard.type(ADMIN_KEY)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("main")).to_be_focused()
    page.set_viewport_size({"width": NARROW, "height": HEIGHT})
    for path in PAGES:
        page.goto(f"{stack.console}{path}")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= NARROW, f"{path} is {width} px wide at {NARROW} px"
        assert not re.search(r"Traceback|Internal", page.content())
    # A round's flagged samples, reached from the rounds page; a sample's conversation
    # opens from the keyboard.
    page.goto(f"{stack.console}/rounds")
    page.get_by_role("link", name=re.compile("^flagged samples")).first.click()
    expect(page.get_by_role("heading", name="Flagged samples")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= NARROW, f"a round's page is {width} px wide at {NARROW} px"
    context = page.locator("details.context").first
    context.locator("summary").focus()
    page.keyboard.press("Enter")
    expect(context).to_have_attribute("open", "")
