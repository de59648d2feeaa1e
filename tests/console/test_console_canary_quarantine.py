"""The console's Canary and Quarantine pages and their actions, in process, over the
admin API (the browser tests drive the same through Chromium)."""

from __future__ import annotations

import html

from console_client import signed_in_token
from console_stack import ADMIN_KEY, END_USER, OTHER_END_USER, QUARANTINE_REASON
from litestar import Litestar
from litestar.testing import AsyncTestClient

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_canary_page_shows_the_latest_canary_and_its_tests(
    client: AsyncTestClient[Litestar],
) -> None:
    """The seeded canary, rolled back by the monitor: its share, who started it, both
    tests with each arm's counts and rates and the statistic against its threshold, the
    decision with who and why; version 1 may be started, version 2 (rejected) may not."""
    await signed_in_token(client)
    page = (await client.get("/console/canary")).text
    status = (await client.get("/admin/canary", headers=ADMIN, params={"alias": "chat"})).json()
    toxicity = next(test for test in status["tests"] if test["metric"] == "toxicity")
    assert "Latest canary <code>chat-v0002</code>" in page
    assert '<span class="status rolled_back">rolled_back</span>' in page
    assert "10.0 % of the conversations to <code>chat-v0002</code>" in page
    assert "by <code>env-admin</code>" in page
    assert f"by <code>learner</code>: {html.escape(status['reason'])}" in page
    assert "Toxic replies" in page and "Canned or refusal replies" in page
    assert (
        f"canary {toxicity['canary_events']}/{toxicity['canary_replies']} · stable "
        f"{toxicity['stable_events']}/{toxicity['stable_replies']}" in page
    )
    assert (
        f"log likelihood ratio {toxicity['log_likelihood_ratio']:.2f} vs threshold "
        f"{toxicity['log_threshold']:.2f}" in page
    )
    assert "significant excess" in page and "no significant excess" in page
    assert '<option value="chat-v0001"' in page
    assert '<option value="chat-v0002"' not in page
    assert "Abort canary" not in page  # none runs
    live = await client.get("/console/live/canary")
    assert live.text.startswith('<div id="canary-live"')


async def test_canary_is_started_and_aborted_through_the_console(
    client: AsyncTestClient[Litestar],
) -> None:
    """Start (the admin API loads it; the page shows it running with its share), a second
    start refused with the admin API's reason, a share that is no number refused, abort
    with a reason (the page shows it aborted by the operator, and why), and both actions
    in the audit log."""
    token = await signed_in_token(client)
    started = await client.post(
        "/console/canary", data={"csrf_token": token, "version": "chat-v0001", "share": "0.25"}
    )
    assert "Canary chat-v0001 answers 25% of chat&#39;s conversations" in started.text
    assert "Running canary <code>chat-v0001</code>" in started.text
    assert "25.0 % of the conversations" in started.text
    assert "Abort canary of chat" in started.text
    again = await client.post(
        "/console/canary", data={"csrf_token": token, "version": "chat-v0001", "share": "0.25"}
    )
    assert "No canary of chat-v0001 started:" in again.text and "already runs" in again.text
    wrong = await client.post(
        "/console/canary", data={"csrf_token": token, "version": "chat-v0001", "share": "lots"}
    )
    assert "The share must be a number between 0 and 1." in wrong.text
    aborted = await client.post(
        "/console/canary/abort", data={"csrf_token": token, "alias": "chat", "reason": "ticket 7"}
    )
    assert "Canary chat-v0001 of chat aborted" in aborted.text
    assert '<span class="status aborted">aborted</span>' in aborted.text
    assert "by <code>env-admin</code>: ticket 7" in aborted.text
    status = (await client.get("/admin/canary", headers=ADMIN, params={"alias": "chat"})).json()
    assert (status["state"], status["reason"]) == ("aborted", "ticket 7")
    entries = (await client.get("/admin/audit", headers=ADMIN)).json()
    assert {"canary_start", "canary_abort"} <= {entry["action"] for entry in entries}
    forged = await client.post("/console/canary/abort", data={"alias": "chat"})
    assert forged.status_code == 403


async def test_quarantine_page_lists_quarantines_and_flagged_users(
    client: AsyncTestClient[Litestar],
) -> None:
    """The learner's quarantine of an end user with its round and reason, the end users'
    and keys' flagged counts (the quarantined one marked, the others with a prefilled
    form link), and the form filled in from that link."""
    await signed_in_token(client)
    page = (await client.get("/console/quarantine")).text
    active = page.split('class="stacking quarantined"')[1].split("</table>")[0]
    assert f"<code>{OTHER_END_USER}</code>" in active and QUARANTINE_REASON in active
    assert "<code>learner</code> (round" in active
    users = page.split('id="flagged-users-title"')[1].split("</table>")[0]
    assert users.index(f"<code>{END_USER}</code>") < users.index(f"<code>{OTHER_END_USER}</code>")
    assert f"/console/quarantine?kind=user&amp;subject={END_USER}#quarantine-form" in users
    assert '<span class="tag warn">quarantined</span>' in users
    assert "Flagged samples per key" in page
    prefilled = (await client.get(f"/console/quarantine?kind=user&subject={END_USER}")).text
    assert f'name="subject" required maxlength="256" value="{END_USER}"' in prefilled
    assert '<option value="user" selected>' in prefilled
    bad = await client.get("/console/quarantine?kind=robot")
    assert bad.status_code == 400


async def test_quarantine_and_release_through_the_console(
    client: AsyncTestClient[Litestar],
) -> None:
    """Quarantine an end user by hand (listed with the operator and the reason), a second
    time refused with the admin API's reason (the form kept), a release (gone from the
    list, shown as released), and an empty reason refused naming the field."""
    token = await signed_in_token(client)
    form = {"csrf_token": token, "kind": "user", "subject": END_USER, "reason": "ticket 9"}
    added = await client.post("/console/quarantine", data=form)
    assert f"The user {END_USER} is quarantined" in added.text
    active = added.text.split('class="stacking quarantined"')[1].split("</table>")[0]
    assert f"<code>{END_USER}</code>" in active and "ticket 9" in active
    assert "<code>env-admin</code>" in active
    again = await client.post("/console/quarantine", data=form)
    assert "Not quarantined:" in again.text
    assert 'value="ticket 9"' in again.text
    empty = await client.post(
        "/console/quarantine", data={**form, "subject": "carol", "reason": ""}
    )
    assert "Not quarantined:" in empty.text and "reason" in empty.text
    released = await client.post(
        "/console/quarantine/release",
        data={"csrf_token": token, "kind": "user", "subject": END_USER},
    )
    assert f"The user {END_USER} is released" in released.text
    active = released.text.split('class="stacking quarantined"')[1].split("</table>")[0]
    assert f"<code>{END_USER}</code>" not in active
    history = released.text.split('class="stacking released"')[1].split("</table>")[0]
    assert f"<code>{END_USER}</code>" in history
    listed = (await client.get("/admin/quarantine", headers=ADMIN)).json()
    assert [item["subject"] for item in listed] == [OTHER_END_USER]
