"""The playground page in headless Chromium (Debian's `chromium`, driven by Playwright with that executable; no
browser download): load it, ask with two profiles, see two streamed answers; then a choice question shows each
profile's option distribution as bars. Skipped, with the reason, only where Chromium is not installed outside CI
(.ci/run installs it; under CI=true a missing browser is a failure)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from test_serve import ServerProcess, make_serve_dirs

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    for path in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    reason = "Debian's chromium is not installed (apt-get install -y chromium); the playground test needs it"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run should have installed it")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    dirs = make_serve_dirs(tmp_path_factory.mktemp("serve-browser"))
    proc = ServerProcess(["--model", str(dirs["model"]), "--adapter", str(dirs["adapter"]), "--served-name", "tiny"])
    yield proc
    proc.close()


def test_playground_streams_two_answers_and_shows_choice_bars(browser, page_server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(page_server.url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert "tiny" in page.inner_text("#model-info")
    cards = page.query_selector_all(".profile-card")
    assert len(cards) == 2
    assert [c.query_selector("input[data-field=country]").input_value() for c in cards] == ["Egypt", "Sweden"]
    cards[1].query_selector("input[data-field=age_group]").fill("18-24 years old")  # an edited field is sent
    page.fill("#question", "How important is family in your life?")
    page.fill("#max-tokens", "24")
    page.click("#ask")
    page.wait_for_function("document.querySelectorAll('.profile-card[data-state=done]').length == 2",
                           timeout=60_000)
    answers = [c.inner_text() for c in page.query_selector_all(".answer")]
    assert len(answers) == 2 and all(a.strip() for a in answers)
    assert page.query_selector_all(".profile-card[data-state=error]") == []
    profiles = sorted((b["profile"] for b in sent), key=lambda p: p["country"])
    assert [p["country"] for p in profiles] == ["Egypt", "Sweden"] and all(b["stream"] for b in sent)
    assert profiles[1]["age_group"] == "18-24 years old"
    # the same question as multiple choice: one bar per option for each profile, summing to 100 %
    page.click("#mode-choice")
    page.click("#ask")
    page.wait_for_function("document.querySelectorAll('.profile-card[data-state=done] .bar-row').length == 8",
                           timeout=60_000)
    for card in page.query_selector_all(".profile-card"):
        pcts = [float(x.inner_text().rstrip("%")) for x in card.query_selector_all(".bar-pct")]
        assert len(pcts) == 4 and abs(sum(pcts) - 100) < 0.5
        assert len(card.query_selector_all(".bar-row.top")) == 1
    # up to four profiles, at least two
    page.click("#add-profile")
    page.click("#add-profile")
    assert len(page.query_selector_all(".profile-card")) == 4 and page.is_disabled("#add-profile")
    assert errors == []
    page.close()
