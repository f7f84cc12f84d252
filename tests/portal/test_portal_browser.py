"""The analyst's path in real headless Chromium against a live server, a real Celery worker and real Redis."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from docx import Document as DocxDocument
from playwright.sync_api import expect, sync_playwright

from live_stack import ROOT, LiveStack
from portal_helpers import AMCOR

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
USERS = """
from django.contrib.auth.models import Group, User
desk = Group.objects.create(name="Credit desk")
for name in ("alice", "bob"):
    User.objects.create_user(name, email=f"{name}@example.com", password=f"pw-{name}-e2e-123")
User.objects.get(username="alice").groups.add(desk)
"""

DROP = """([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type: "application/pdf"}));
  return dt;
}"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = LiveStack(tmp_path_factory.mktemp("live"))
    s.start()
    s.manage("shell", "-c", USERS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _sign_in(page, stack, user: str) -> None:
    page.goto(stack.url + "/")
    expect(page).to_have_url(stack.url + "/accounts/login/?next=/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", f"pw-{user}-e2e-123")
    page.click("#login-form button[type=submit]")
    expect(page.locator(".who")).to_have_text(user)


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"portal-{name}.png"), full_page=True)


def test_analyst_uploads_asks_follows_citation_drafts_report(stack, browser):
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    try:
        _sign_in(page, stack, "alice")
        _shot(page, "1-signed-in")

        page.goto(stack.url + "/upload/")
        page.fill("input[name=company]", "Amcor")
        page.fill("input[name=ticker]", "AMCR")
        dt = page.evaluate_handle(DROP, [AMCOR.name, base64.b64encode(AMCOR.read_bytes()).decode()])
        page.dispatch_event("#drop-zone", "drop", {"dataTransfer": dt})
        row = page.locator("tr.upload-row").first
        expect(row.locator("progress")).to_have_attribute("value", "100")
        expect(row).to_have_attribute("data-status", "indexed", timeout=300_000)
        doc_id = row.get_attribute("data-document-id")
        _shot(page, "2-indexed")

        page.goto(stack.url + "/")
        page.evaluate("""() => { window.__updates = 0; new MutationObserver((m) => { window.__updates += m.length; })
                         .observe(document.getElementById('turns'), {subtree: true, childList: true, characterData: true}); }""")
        page.fill("#question", "Who signed for Amcor as Company Secretary?")
        page.click("#ask-button")
        answer = page.locator(".turn.answer.done").last
        expect(answer).to_contain_text("Damien Clayton", timeout=180_000)
        assert page.evaluate("window.__updates") > 3  # the answer arrived in pieces, not in one update
        cite = answer.locator("a.cite").first
        expect(cite).to_be_visible()
        _shot(page, "3-answer")

        cite.click()
        page.wait_for_url(f"{stack.url}/documents/{doc_id}/?page=3&chunk=*")
        expect(page.locator("#page-3 mark.cited")).to_contain_text("Damien Clayton")
        expect(page.locator("#page-3 img.page-image")).to_be_visible()
        _shot(page, "4-cited-page")

        page.goto(stack.url + "/reports/")
        page.fill("#template-form input[name=title]", "Amcor notes")
        page.fill("#template-form textarea[name=sections]", "Signatures: Who signed for Amcor as Company Secretary?")
        page.click("#template-form button")
        page.locator(".template button.draft").first.click()
        expect(page.locator("#report-status")).to_have_text("done", timeout=240_000)
        expect(page.locator("textarea[name=section_text]")).to_contain_text("Damien Clayton")
        _shot(page, "5-report")
        with page.expect_download() as dl:
            page.click("#docx-link")
        path = Path(dl.value.path())
        paras = [p.text for p in DocxDocument(io.BytesIO(path.read_bytes())).paragraphs]
        assert "Amcor notes" in paras and "Sources" in paras and any("Damien Clayton" in p for p in paras)

        other = browser.new_context().new_page()
        other.set_default_timeout(30_000)
        _sign_in(other, stack, "bob")
        other.goto(stack.url + "/documents/")
        expect(other.locator("#document-table")).not_to_contain_text("AMCOR")
        resp = other.goto(f"{stack.url}/documents/{doc_id}/")
        assert resp.status == 404
        assert other.request.get(f"{stack.url}/documents/{doc_id}/download/").status == 404
        other.goto(stack.url + "/")
        other.fill("#question", "Who signed for Amcor as Company Secretary?")
        other.click("#ask-button")
        expect(other.locator(".turn.answer.done").last).to_have_class("turn answer done not-found", timeout=120_000)
        expect(other.locator(".turn.answer.done a.cite")).to_have_count(0)
        _shot(other, "6-second-user")
    except Exception:
        _shot(page, "failure")
        print("WORKER LOG:\n", stack.log("worker"), "\nWEB LOG:\n", stack.log("web"))
        raise
    finally:
        ctx.close()
