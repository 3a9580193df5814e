"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright, against
the real server of test_serve (the default model on 2 local Ray stages and a prefill pool) on 127.0.0.1.
A screenshot of each view is saved under test-artifacts/dashboard/ (or $SHARDWISE_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, cli

CHROMIUM = os.environ.get("SHARDWISE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# what a headless Chromium needs here: no sandbox as root, and no calls home on a closed network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
ARTIFACTS = Path(os.environ.get("SHARDWISE_ARTIFACTS", "test-artifacts")) / "dashboard"

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="Playwright is not installed: `make test` installs it "
                                                       "(the dev extra)"),
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed and `make test` could not "
                                                "install it (apt-get install chromium needs root): set "
                                                "SHARDWISE_CHROMIUM to a Chromium binary to run these"),
]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, api_server):
    """The dashboard, connected with the API key; fails the test that saw any console error."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.errors = []
    page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(api_server)
    yield page
    page.close()


def view(page, name: str) -> None:
    page.click(f"nav button[data-view='{name}']")
    expect(page.locator(f"#view-{name}")).to_be_visible()


def fill(page, values: dict[str, str]) -> None:
    for selector, value in values.items():
        page.fill(selector, value)


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def test_the_page_asks_for_the_key_and_holds_no_secret(page, api_server):
    assert API_KEY not in httpx.get(api_server).text
    assert httpx.get(f"{api_server}/v1/dashboard/state").status_code == 401
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key", API_KEY)
    page.click("#key-form button")
    expect(page.locator("#status")).to_have_text("serving")
    expect(page.locator("#model")).to_contain_text("smollm2-135m")
    assert page.errors == []


def test_cluster_view_draws_the_running_plan(page, api_server):
    view(page, "cluster")
    stages = httpx.get(f"{api_server}/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()["stages"]
    expected = [f"{a}-{b}" for a, b in (s["layers"] for s in stages)]
    boxes = page.locator("#pipeline .stage")
    expect(boxes).to_have_count(len(stages))
    assert [boxes.nth(i).get_attribute("data-layers") for i in range(len(stages))] == expected == \
        ["0-30", "0-15", "15-30"]  # (the prefill pool's stage, then the decode pool's)
    rows = page.locator("#stages tbody tr")
    expect(rows).to_have_count(len(stages))
    for i, stage in enumerate(stages):
        cells = rows.nth(i).locator("td")
        assert cells.nth(3).inner_text() == str(stage["pid"])  # the live processes, not the plan file
        assert "MB" in cells.nth(5).inner_text()  # weights held
    screenshot(page, "cluster")
    assert page.errors == []


def test_a_chat_message_streams_a_reply(page):
    view(page, "chat")
    fill(page, {"#temperature": "0", "#max-tokens": "24", "#chat-input": "What is the capital of France?"})
    page.click("#send")
    reply = page.locator(".message.assistant").last
    expect(reply.locator(".stats")).to_contain_text("tok/s", timeout=60_000)
    assert "Paris" in reply.locator(".text").inner_text()
    assert int(reply.get_attribute("data-chunks")) > 1  # it arrived in pieces, as it was generated
    assert "TTFT" in reply.locator(".stats").inner_text()
    screenshot(page, "chat")
    assert page.errors == []


def test_rates_view_shows_the_served_requests(page, api_server):
    view(page, "rates")
    done = [float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{api_server}/metrics").text.splitlines()
            if line.startswith("shardwise:request_success_total")]
    expect(page.locator("#kpi-done")).to_have_text(str(int(sum(done))), timeout=5_000)  # /metrics' own count
    expect(page.locator("#kpi-ttft")).not_to_contain_text("– /")  # a percentile of the chat's first token
    blocks = [line.rsplit(" ", 1)[1] for line in httpx.get(f"{api_server}/metrics").text.splitlines()
              if line.startswith("shardwise:prefix_cache_blocks")]
    expect(page.locator("#kpi-prefix")).to_contain_text(f"/ {int(float(blocks[0]))}", timeout=5_000)
    expect(page.locator("#chart-tokens canvas")).to_have_count(1)
    page.wait_for_timeout(1500)  # a few more points on the charts
    screenshot(page, "rates")
    assert page.errors == []


def test_estimate_form_returns_the_clis_numbers(page):
    view(page, "estimate")
    page.select_option("#est-model", "llama-3.1-8b")
    fill(page, {"#est-devices": "rtx-4090,rtx-3090", "#est-batch": "4", "#est-input": "256", "#est-output": "64"})
    page.select_option("#est-quant", "int4")
    page.click("#estimate-form button")
    expect(page.locator("#est-result")).to_be_visible()
    result = cli("estimate", "--model", "llama-3.1-8b", "--pp-devices", "rtx-4090,rtx-3090", "--batch", "4",
                 "--input", "256", "--output", "64", "--quant", "int4", "--json")
    assert result.returncode == 0, result.stderr
    expected = json.loads(result.stdout)
    shown = {key: float(page.get_attribute(f"#est-{key}", "data-value")) for key in ("ttft", "tpot", "throughput",
                                                                                     "memory")}
    assert shown == {"ttft": expected["ttft_s"], "tpot": expected["tpot_s"],
                     "throughput": expected["throughput_tok_s"], "memory": expected["memory"]["total"]}
    expect(page.locator("#est-stages tbody tr")).to_have_count(2)
    expect(page.locator("#chart-roofline canvas")).to_have_count(1)

    page.fill("#est-devices", "no-such-gpu")
    page.click("#estimate-form button")
    expect(page.locator("#est-error")).to_contain_text("no-such-gpu")
    assert page.errors == [] or all("400" in e for e in page.errors)  # the refused form's own request
    page.errors.clear()


def test_plan_form_compares_the_dp_plan_with_the_baselines(page, tmp_path):
    view(page, "estimate")
    page.select_option("#plan-model", "llama-3.1-8b")
    page.click("#plan-form button")
    rows = page.locator("#plan-table tbody tr")
    expect(rows).to_have_count(5)  # the DP plan and four baselines
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(page.input_value("#plan-cluster"))
    result = cli("plan", "--model", "llama-3.1-8b", "--cluster", str(cluster), "--json")
    assert result.returncode == 0, result.stderr
    assert rows.nth(0).locator("td").nth(1).inner_text() == json.loads(result.stdout)["dp"]["layout"]
    assert rows.nth(0).locator("td").nth(3).inner_text() == "1.00×"
    screenshot(page, "estimate")
    assert page.errors == []
