"""The run page's stage checkpoints, in a real browser against the real app with auth on: listed per stage with
their metrics and URI; the roll-back control disabled, with the reason, for a viewer; an operator's click queues the
rollback command; a rolled-back decision shows as such."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import Browser, expect

from tests.conftest import LiveServer
from tests.test_dashboard import opened_tab, secured, shot, sign_in, wait_chart

__all__ = ["secured"]  # the fixture, imported for the tests below

pytestmark = pytest.mark.slow


def test_checkpoints_listed_and_rolled_back_from_the_page(
    secured: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    server, tokens = secured
    worker = {"Authorization": f"Bearer {tokens['worker']}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=worker) as client:
        run_id = client.post("/api/v1/runs", json={"name": "ckpt-page"}).json()["id"]
        points = [{"key": "lr", "step": s, "value": 0.1 if s <= 50 else 0.01} for s in range(1, 101)]
        points += [{"key": "train/loss", "step": s, "value": 2.0 - s / 100} for s in range(1, 101)]
        assert client.post(f"/api/v1/runs/{run_id}/metrics", json={"points": points}).status_code == 200
        for step, uri in ((50, "/ckpts/stage-end-step50.pt"), (80, "s3://bucket/run/ckpt-80.pt")):
            body = {"step": step, "uri": uri, "stage": 0 if step == 50 else 1, "lr": 0.1 if step == 50 else 0.01}
            assert client.post(f"/api/v1/runs/{run_id}/checkpoints", json=body).status_code == 201

    with opened_tab(browser, server.url) as tab:
        page = tab.page
        page.goto(f"{server.url}/ui/run.html?id={run_id}")
        sign_in(page, tokens["viewer"])
        wait_chart(page)
        rows = page.locator("#checkpoints tr")
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_contain_text("S0")
        expect(rows.nth(0)).to_contain_text("/ckpts/stage-end-step50.pt")
        expect(rows.nth(0)).to_contain_text("train/loss 1.5")  # the metrics read out of the points at step 50
        expect(rows.nth(1)).to_contain_text("S1")
        expect(rows.nth(1)).to_contain_text("s3://bucket/run/ckpt-80.pt")
        roll_back = page.get_by_role("button", name="Roll the run back to the checkpoint at step 50")
        expect(roll_back).to_be_disabled()
        expect(page.locator("#checkpoints-note")).to_contain_text("deciding and acting need an operator token")

        page.locator("#signin summary").click()
        page.get_by_role("button", name="Sign out").click()
        sign_in(page, tokens["operator"])
        wait_chart(page)
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Roll the run back to the checkpoint at step 50").click()
        expect(page.locator("#checkpoints-status")).to_contain_text("Rollback to step 50 sent to the worker")
        expect(page.locator("#decisions")).to_contain_text("roll back to step 50")
        shot(page, "run-page-checkpoints")

    operator = {"Authorization": f"Bearer {tokens['operator']}"}
    with httpx.Client(base_url=server.url, timeout=30, headers=operator) as client:
        (command,) = client.get(f"/api/v1/runs/{run_id}/decisions").json()
        assert (command["action"], command["step"], command["actor"]) == ("rollback", 50, "token:operator-token")
