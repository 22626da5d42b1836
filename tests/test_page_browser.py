"""The live page of a 3-daemon cluster in headless Chromium (Debian's chromium and
chromium-driver, driven by selenium): what it shows after the page's scripts ran must match
`peerd status --json` and rounds.jsonl; the cluster's merged page lists the same members."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from daemons import ClusterCa, kill_all, start_loopback_daemons

from peerd.cluster import free_ports
from peerd.web.cluster_page import ClusterFacts, ClusterPage, WatchedDaemon

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (scripts/install.sh --test)")
ROUNDS = 3
MU = 0.5
# Navigation to the first drawing with data: the issue asks under a second on this machine
# (README: measured); the test allows for a CI machine busy with other tests.
LOAD_LIMIT_MS = 3000


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1250"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 15).until(
        lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


# The page redraws at every poll: what it shows is read in one script, between two polls.
SNAPSHOT = """
const all = (selector, root = document) => [...root.querySelectorAll(selector)];
return {
  round: document.getElementById("round").textContent,
  firstRenderMs: Number(document.body.dataset.firstRenderMs),
  members: all("#members tbody tr").map((row) => ({
    peer: row.dataset.peer, round: Number(row.dataset.round), state: row.dataset.state,
    link: row.querySelector("a") ? row.querySelector("a").href : null})),
  groups: all("#windows .group").map((group) => ({
    name: group.dataset.group,
    units: Number(group.querySelector(".group-title span").textContent.split("·")[1].trim()
      .split(" ")[0]),
    lanes: all(".lane", group).map((lane) => ({
      peer: lane.dataset.peer, width: Number(lane.dataset.width),
      bars: all(".window", lane).map((bar) => ({
        peer: bar.dataset.peer, length: Number(bar.dataset.length)}))}))})),
  lines: all("[data-chart] polyline").map((line) => ({
    chart: line.closest("[data-chart]").dataset.chart, series: line.dataset.series,
    points: Number(line.dataset.points), last: Number(line.dataset.last)})),
  legend: all("#legend [data-series]").map((item) => item.dataset.series),
};
"""


def snapshot(driver) -> dict:
    return driver.execute_script(SNAPSHOT)


def shown_rounds(shown: dict) -> dict[str, int]:
    return {member["peer"]: member["round"] for member in shown["members"]}


def line(shown: dict, chart: str, series: str) -> dict:
    (found,) = [x for x in shown["lines"] if x["chart"] == chart and x["series"] == series]
    return found


def test_page_of_three_daemons_matches_status_and_rounds(tmp_path: Path, cluster_ca: ClusterCa,
                                                         browser) -> None:
    metrics_ports = free_ports(3)
    # The third daemon's page listens on another loopback address than its gRPC port.
    hosts = ["127.0.0.1", "127.0.0.1", "127.0.0.2"]
    pages = [f"http://{host}:{port}/" for host, port in zip(hosts, metrics_ports, strict=True)]
    daemons = start_loopback_daemons(
        tmp_path, 3, ["--sync", "--rounds", str(ROUNDS), "--linger", "120", "--mu", str(MU)],
        cluster_ca, extra_by_position={
            i: ["--metrics-port", str(port), "--metrics-host", host]
            for i, (port, host) in enumerate(zip(metrics_ports, hosts, strict=True))})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for daemon in daemons:
            daemon.wait_rounds(ROUNDS)
        time.sleep(1.0)  # a round of handshakes: every daemon has heard the others finish
        shown = subprocess.run(
            [sys.executable, "-m", "peerd.cli", "status", "--addr", daemons[0].address, "--json",
             *cluster_ca.flags("admin")], capture_output=True, text=True, timeout=60, check=True)
        status = json.loads(shown.stdout)
        expected = {status["self"]["peer_id"]: int(status["self"]["round"]),
                    **{p["peer_id"]: int(p["round"]) for p in status["peers"]}}
        assert expected == {d.peer_id: ROUNDS for d in daemons}
        assert f"page on {pages[2]}" in daemons[2].output()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_ports[2]}/api/status", timeout=5)

        open_page(browser, pages[0])
        shown = snapshot(browser)
        print(f"page load to first drawing with data: {shown['firstRenderMs']:.0f} ms")
        assert shown["firstRenderMs"] < LOAD_LIMIT_MS
        assert shown_rounds(shown) == expected
        assert shown["round"] == status["self"]["round"]
        assert {m["state"] for m in shown["members"]} == {"waiting"}  # all rounds done
        # The windows: one per member in every unit group, as wide as its mu makes it.
        assert shown["groups"]
        for group in shown["groups"]:
            assert [lane["peer"] for lane in group["lanes"]] == sorted(expected)
            for lane in group["lanes"]:
                assert {bar["peer"] for bar in lane["bars"]} == {lane["peer"]}
                covered = sum(bar["length"] for bar in lane["bars"])
                assert covered == lane["width"] == math.ceil(MU * group["units"])
        # The curves: every record of rounds.jsonl, the last value as written.
        records = daemons[0].rounds()
        assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
        for chart, field in (("train_loss", "train_loss"), ("round_time", "round_s"),
                             ("local_metric", "local_acc")):
            drawn = line(shown, chart, "peer-00")
            assert drawn["points"] == len(records)
            assert drawn["last"] == pytest.approx(records[-1][field])
        assert line(shown, "bytes_sent", "peer-00")["last"] == (
            records[-1]["bytes_sent_cum"] - records[-2]["bytes_sent_cum"])
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        browser.save_screenshot(str(tmp_path / "daemon-page.png"))

        # The cluster's own page merges the three.
        page = ClusterPage(ClusterFacts("test", "ring", "msfusion", "digits", "accuracy", ROUNDS),
                           [WatchedDaemon(d.peer_id, url, d.state_dir)
                            for d, url in zip(daemons, pages, strict=True)],
                           tmp_path / "metrics.jsonl")
        port = asyncio.run_coroutine_threadsafe(page.start("127.0.0.1", 0), loop).result(10)
        try:
            open_page(browser, f"http://127.0.0.1:{port}/")
            shown = snapshot(browser)
            assert shown_rounds(shown) == expected
            assert [m["link"] for m in shown["members"]] == pages
            assert shown["legend"] == [*expected, "assembled"]
            for daemon in daemons:
                assert line(shown, "train_loss", daemon.peer_id)["last"] == pytest.approx(
                    daemon.rounds()[-1]["train_loss"])
        finally:
            asyncio.run_coroutine_threadsafe(page.stop(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        kill_all(daemons)
