"""The web dashboard: token and 403, the JSON API over a live training, bad input, the offline fallback, and the page
itself in headless Chromium (marked `browser`; skipped when chromium, chromedriver or selenium are missing)."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import cpu_sft_config
from peft import LoraConfig
from transformers import PrinterCallback, set_seed

from rf_callbacks import RFSFTTrainer
from rf_callbacks.control.client import NoTraining, request
from rf_callbacks.dashboard import Dashboard
from rf_callbacks.dashboard.server import _finite
from rf_callbacks.demo import build_tiny_model
from rf_callbacks.ledger import read_ledger
from rf_callbacks.ops import OpError

REPO = Path(__file__).resolve().parents[1]
# Debian's `chromium` and `chromium-driver` (.ci/install-browser.sh installs them); never a downloaded browser.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def until(condition, timeout: float = 60.0, what: str = "condition"):
    """Poll `condition()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def call(
    dashboard: Dashboard,
    path: str,
    body: Any = None,
    token: str | None = "header",
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One HTTP request to the dashboard: `(status, decoded JSON or text)`. `token`: "header", "query", None or a
    wrong value sent as the header."""
    base = dashboard.url.split("/?")[0]
    headers = {}
    if token == "header":
        headers["X-RF-Token"] = dashboard.token
    elif token == "query":
        path += ("&" if "?" in path else "?") + "token=" + dashboard.token
    elif token is not None:
        headers["X-RF-Token"] = token
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, payload, kind = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        status, payload, kind = error.code, error.read(), error.headers.get("Content-Type", "")
    return status, json.loads(payload) if kind.startswith("application/json") else payload.decode()


def statuses(dashboard: Dashboard) -> dict[str, str]:
    status, reply = call(dashboard, "/api/runs")
    assert status == 200, reply
    return {row["name"]: row["status"] for row in reply["runs"]}


@pytest.fixture(scope="module")
def finished(tokenizer, chat_data, tmp_path_factory) -> Path:
    """The output folder of a finished experiment: runs x and y, 4 steps each over 2 chunks.

    Built before `live` (which asks for it): building a Trainer resets transformers' process-wide `AcceleratorState`,
    which breaks a training running in another thread, so no trainer may be built while `live` trains.
    """
    out = tmp_path_factory.mktemp("dashboard-done") / "out"
    set_seed(7)
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=cpu_sft_config(out, max_steps=4),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=[{"name": "x", "peft_config": LoraConfig(r=2, target_modules=["q_proj"])}, {"name": "y"}],
        peft_config=LoraConfig(r=4, target_modules=["v_proj"]),
        num_chunks=2,
    )
    trainer.train()
    trainer.close()
    return out


@pytest.fixture(scope="module")
def live(tokenizer, chat_data, tmp_path_factory, finished):
    """A training of runs a, b, c (1000 steps each, 4 chunks of 6 steps) in a background thread, with a dashboard on
    its folder. At the end every run is stopped, so the thread ends within a step."""
    out = tmp_path_factory.mktemp("dashboard") / "out"
    set_seed(7)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = RFSFTTrainer(
        model=build_tiny_model(tokenizer),
        args=cpu_sft_config(out, max_steps=1000),
        train_dataset=chat_data[0],
        eval_dataset=chat_data[1],
        processing_class=tokenizer,
        configs=[
            {"name": name, "peft_config": LoraConfig(**lora), "learning_rate": lr}
            for name, lr in (("a", 1e-3), ("b", 3e-3), ("c", 1e-2))
        ],
        num_chunks=4,
    )
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log from the training thread
    errors: list[BaseException] = []

    def train():
        try:
            trainer.train()
        except BaseException as error:  # surfaced by the fixture's teardown
            errors.append(error)

    thread = threading.Thread(target=train, name="rf-test-training", daemon=True)
    thread.start()

    def answering():
        try:
            return request(out, {"op": "status"})["training"]
        except (NoTraining, OSError):
            return False

    until(answering, 120, "the control socket")
    dashboard = Dashboard(out)
    dashboard.start()
    yield SimpleNamespace(trainer=trainer, out=out, dashboard=dashboard)
    dashboard.stop()
    for name in list(trainer.runs.runs):
        with contextlib.suppress(OpError):  # already stopped, deleted or done
            trainer.stop(name)
    thread.join(120)
    assert not thread.is_alive(), "the training did not end after every run was stopped"
    assert not errors, errors
    assert not [row for row in trainer.results() if row["status"] == "failed"], trainer.results()
    trainer.close()


# ------------------------------------------------------------------------------------------------------- no training
def test_token_guards_every_route(live):
    dashboard = live.dashboard
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{32}", dashboard.url)
    for path in ("/", "/?token=wrong", "/api/runs", "/api/status", "/api/metrics", "/nowhere"):
        status, _ = call(dashboard, path, token=None)
        assert status == 403, path
    status, reply = call(dashboard, "/api/runs", token="not-the-token")
    assert status == 403 and reply == {"ok": False, "error": "forbidden: missing or wrong token"}
    status, reply = call(dashboard, "/api/op", {"op": "stop", "run": "a"}, token=None)
    assert status == 403 and live.trainer.runs["a"].status != "stopped"
    status, reply = call(dashboard, "/api/op", {"op": "stop", "run": "a"}, token=dashboard.token[:-1])
    assert status == 403

    status, page = call(dashboard, "/", token="query")
    assert status == 200 and 'id="runs-body"' in page and "<canvas" in page
    status, page = call(dashboard, "/", token="header")  # the page itself wants the token in its URL
    assert status == 403
    assert call(dashboard, "/api/status", token="query")[0] == 200
    assert call(dashboard, "/api/status", token="header")[0] == 200


def test_api_reads_the_live_training(live):
    dashboard = live.dashboard
    status, reply = call(dashboard, "/api/runs")
    assert status == 200 and reply["ok"] and reply["live"]
    rows = {row["name"]: row for row in reply["runs"]}
    assert {"a", "b", "c"} <= set(rows)
    assert rows["a"]["max_steps"] == 1000 and {"status", "global_step", "train_loss", "eval_loss"} <= set(rows["a"])

    status, reply = call(dashboard, "/api/status")
    assert status == 200 and reply["training"] is True and reply["num_chunks"] == 4

    until(lambda: live.trainer.runs["a"].global_step >= 2, what="run a to log")
    status, reply = call(dashboard, "/api/metrics?run=a&last=2")
    assert status == 200 and list(reply["metrics"]) == ["a"]
    entries = reply["metrics"]["a"]
    assert 1 <= len(entries) <= 2 and all("step" in entry for entry in entries)
    status, reply = call(dashboard, "/api/metrics?last=1")
    assert status == 200 and {"a", "b", "c"} <= set(reply["metrics"])

    status, reply = call(dashboard, "/api/metrics?run=zzz")
    assert status == 400 and "unknown run 'zzz'" in reply["error"]


def test_ops_through_the_api(live):
    dashboard, trainer = live.dashboard, live.trainer
    status, reply = call(dashboard, "/api/op", {"op": "stop", "run": "a"})
    assert (status, reply["ok"], reply["run"]) == (200, True, "a")
    until(lambda: statuses(dashboard)["a"] == "stopped", what="a to be stopped")
    status, reply = call(dashboard, "/api/op", {"op": "stop", "run": "a"})
    assert status == 400 and reply["error"] == "cannot stop run 'a': it is stopped"

    clone = {"op": "clone", "run": "c", "overrides": {"learning_rate": 5e-4, "peft_config.r": 8}, "name": "c-small"}
    status, reply = call(dashboard, "/api/op", clone)
    assert (status, reply["run"]) == (200, "c-small")
    until(lambda: "c-small" in statuses(dashboard), what="the clone to appear")
    status, reply = call(dashboard, "/api/op", {"op": "delete", "run": "c-small"})
    assert status == 200
    until(lambda: statuses(dashboard)["c-small"] == "deleted", what="the clone to be deleted")
    rows = {row["name"]: row for row in call(dashboard, "/api/runs")[1]["runs"]}
    assert rows["c-small"]["parent"] == "c"

    status, reply = call(dashboard, "/api/op", {"op": "resume", "run": "a"})
    assert status == 200
    until(lambda: statuses(dashboard)["a"] in ("running", "pending"), what="a to be resumed")
    assert trainer.runs["b"].status in ("pending", "running")  # left for the browser test

    ledger = read_ledger(live.out / "ledger.jsonl")
    ops = [
        r for r in ledger if r["event"] == "op" and (r["target"] == "a" or "c-small" in (r["target"], r.get("name")))
    ]
    assert [(r["op"], r["target"], r["by"], r["accepted"]) for r in ops] == [
        ("stop", "a", "dashboard", True),
        ("stop", "a", "dashboard", False),
        ("clone", "c", "dashboard", True),
        ("delete", "c-small", "dashboard", True),
        ("resume", "a", "dashboard", True),
    ]


def test_bad_input_gets_a_json_error_and_the_server_keeps_answering(live):
    dashboard = live.dashboard
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'"stop"', 400, "must be a JSON object"),
        (b'{"op": "ls"}', 400, "unknown op 'ls'"),
        (b'{"op": "explode", "run": "a"}', 400, "unknown op 'explode'"),
        (b'{"op": "stop"}', 400, "missing field 'run'"),
        (b'{"op": "stop", "run": 3}', 400, "field 'run' must be str"),
        (b'{"op": "stop", "run": "a", "extra": 1}', 400, "unknown field(s) ['extra']"),
        (b'{"op": "clone", "run": "c", "overrides": {"learing_rate": 1}}', 400, "did you mean 'learning_rate'"),
        (b'{"op": "resume", "run": "nobody"}', 400, "unknown run 'nobody'"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[" * 50_000, 400, "not valid JSON"),
        (b" " * (64 * 1024 + 1), 413, "body over 65536 bytes"),
    ]
    for raw, expected, message in cases:
        status, reply = call(dashboard, "/api/op", raw=raw)
        assert status == expected and reply["ok"] is False and message in reply["error"], (raw[:40], reply)
    assert call(dashboard, "/api/metrics?last=x")[0] == 400
    assert call(dashboard, "/api/metrics?last=0")[0] == 400
    assert call(dashboard, "/nowhere")[0] == 404

    port = int(dashboard.url.split(":")[2].split("/")[0])
    for garbage in (b"GARBAGE\r\n\r\n", b"GET /" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n", b"\x00\x01\x02\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(garbage)
            answer = b"".join(iter(lambda: connection.recv(4096), b""))  # until the server closes it
            assert b'{"ok": false, "error": "' in answer, answer
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:  # a request cut short
        connection.sendall(b"POST /api/op HTTP/1.1\r\nContent-Length: 100\r\nX-RF-Token: " + dashboard.token.encode())
    status, reply = call(dashboard, "/api/runs")
    assert status == 200 and reply["live"]
    assert {"a", "b", "c"} <= set(statuses(dashboard))


# ------------------------------------------------------------------------------------------------------- no training
def test_no_training_answers_503_with_the_saved_results(finished, tmp_path):
    empty = Dashboard(tmp_path / "not-yet")
    empty.start()
    try:
        status, reply = call(empty, "/api/runs")
        assert status == 503 and reply["live"] is False and reply["runs"] == []
        assert "no training is running" in reply["error"]
        assert call(empty, "/", token="query")[0] == 200
    finally:
        empty.stop()

    with Dashboard(finished, token="fixed-token") as dashboard:
        url = dashboard.url
        assert url.endswith("/?token=fixed-token")
        status, reply = call(dashboard, "/api/runs")
        assert status == 503 and reply["ok"] is False and reply["live"] is False
        rows = {row["name"]: row for row in reply["runs"]}
        assert {name: row["status"] for name, row in rows.items()} == {"x": "completed", "y": "completed"}
        assert rows["x"]["global_step"] == 4 and rows["x"]["train_loss"] is not None and rows["x"]["eval_loss"]

        status, reply = call(dashboard, "/api/metrics?run=y&last=1000")
        assert status == 503 and list(reply["metrics"]) == ["y"]
        losses = [entry["loss"] for entry in reply["metrics"]["y"] if "loss" in entry]
        assert len(losses) == 4 and all(isinstance(loss, float) for loss in losses)

        assert call(dashboard, "/api/status")[0] == 503
        status, reply = call(dashboard, "/api/op", {"op": "stop", "run": "x"})
        assert status == 503 and "no training is running" in reply["error"]
        assert call(dashboard, "/api/op", {"op": "stop"})[0] == 400  # checked before the socket is asked
        assert call(dashboard, "/", token=None)[0] == 403
    with pytest.raises(urllib.error.URLError):  # stopped: the port is closed
        urllib.request.urlopen(url, timeout=5)
    assert dashboard.url is None


def test_head_is_get_without_a_body_and_options_is_not_allowed(tmp_path):
    with Dashboard(tmp_path, token="fixed-token") as dashboard:
        port = int(dashboard.url.split(":")[2].split("/")[0])

        def ask(method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                connection.request(method, path, headers=headers or {})
                response = connection.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            finally:
                connection.close()

        token = {"X-RF-Token": "fixed-token"}
        for path, headers in [("/?token=fixed-token", {}), ("/", {}), ("/api/runs", token), ("/api/runs", {})]:
            status, got, body = ask("GET", path, headers)
            head_status, head_headers, head_body = ask("HEAD", path, headers)
            assert head_body == b"" and head_status == status, path
            assert {k: v for k, v in head_headers.items() if k != "Date"} == {
                k: v for k, v in got.items() if k != "Date"
            }, path
            assert int(head_headers["Content-Length"]) == len(body) > 0, path
        assert [ask("HEAD", path)[0] for path in ("/", "/?token=wrong", "/api/status")] == [403, 403, 403]
        assert ask("HEAD", "/api/runs", token)[0] == 503  # no training: as GET

        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:  # not one byte of body
            connection.sendall(b"HEAD /?token=fixed-token HTTP/1.0\r\n\r\n")
            answer = b"".join(iter(lambda: connection.recv(4096), b""))
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"\r\n\r\n"), answer[-200:]

        for path, headers in [("/", {}), ("/api/op", token)]:
            status, got, body = ask("OPTIONS", path, headers)
            assert status == 405 and got["Allow"] == "GET, HEAD, POST", path
            assert json.loads(body) == {"ok": False, "error": "use GET or POST"}


def test_saved_runs_ignore_op_records(tmp_path):
    """Op records have no step, and a refused op may name no run: neither shows in the saved rows."""
    lines = [
        {"run": "x", "step": 0, "chunk": 0, "event": "status", "status": "running"},
        {"run": "x", "step": 3, "chunk": 0, "event": "log", "loss": 2.5},
        {"run": "x", "step": None, "chunk": None, "event": "op", "op": "stop", "target": "x", "accepted": True},
        {"run": "ghost", "step": None, "event": "op", "op": "stop", "target": "ghost", "accepted": False},
        {"run": "x2", "step": 0, "chunk": 1, "event": "status", "status": "pending", "parent": "x"},
    ]
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps({"time": 0.0, **line}) + "\n" for line in lines))
    rows = {row["name"]: row for row in Dashboard(tmp_path).saved_runs()}
    assert set(rows) == {"x", "x2"}
    assert (rows["x"]["global_step"], rows["x"]["train_loss"], rows["x2"]["parent"]) == (3, 2.5, "x")


def test_nan_and_infinity_become_json_strings():
    payload = {"loss": float("nan"), "values": [1.0, float("inf"), -float("inf")], "name": "a"}
    assert _finite(payload) == {"loss": "NaN", "values": [1.0, "Infinity", "-Infinity"], "name": "a"}
    json.dumps(_finite(payload), allow_nan=False)


def test_import_is_light_and_the_page_is_self_contained():
    code = (
        "import sys, rf_callbacks.dashboard; print([m for m in ('torch', 'transformers', 'trl') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    page = (REPO / "rf_callbacks" / "dashboard" / "index.html").read_text()
    assert len(page.encode()) < 25_000
    assert not re.search(r"https?://|//cdn|<script[^>]+src=|<link[^>]+stylesheet", page)


def test_serve_forever_prints_the_url_and_stops_on_ctrl_c(tmp_path):
    code = f"from rf_callbacks.dashboard import serve_forever; serve_forever({str(tmp_path)!r})"
    # A background job (CI, `nohup ... &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    # handler: give the child the default disposition, as a terminal would.
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, preexec_fn=restore
    )
    try:
        line = process.stdout.readline().strip()
        assert re.fullmatch(r"Dashboard: http://127\.0\.0\.1:\d+/\?token=[\w-]+", line), line
        url = line.split(" ", 1)[1]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


# ----------------------------------------------------------------------------------------------------------- browser
@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through its own chromedriver (Selenium Manager is never asked to download)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found; .ci/install-browser.sh installs chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.browser
def test_browser_sees_the_runs_and_stops_one(browser, live, tmp_path):  # browser first: skip before training
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.1)
    browser.get(live.dashboard.url)
    assert browser.title == "rf-callbacks dashboard"

    def rows(driver):
        return {
            row.get_attribute("data-run") for row in driver.find_elements(By.CSS_SELECTOR, "#runs-body tr[data-run]")
        }

    wait.until(lambda d: {"a", "b", "c"} <= rows(d))
    assert browser.find_element(By.ID, "status").text == "live"
    status_b = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="b"] [data-field="status"]')
    step_b = browser.find_element(By.CSS_SELECTOR, 'tr[data-run="b"] [data-field="step"]')
    wait.until(lambda d: int(step_b.text.split("/")[0] or 0) >= 4)  # b has trained, so it has a curve to show
    assert status_b.text == "running"
    stop_b = browser.find_element(By.CSS_SELECTOR, 'button[data-op="stop"][data-run="b"]')
    wait.until(lambda d: stop_b.is_enabled())
    assert not browser.find_element(By.CSS_SELECTOR, 'button[data-op="resume"][data-run="b"]').is_enabled()

    # An op the training refuses shows its reason on the page.
    browser.execute_script("sendOp({op: 'resume', run: 'c'}, () => 'unexpected')")
    wait.until(lambda d: "cannot resume run 'c': it is" in d.find_element(By.ID, "message").text)
    assert "bad" in browser.find_element(By.ID, "message").get_attribute("class")

    stop_b.click()
    wait.until(lambda d: status_b.text == "stopped")
    assert live.trainer.runs["b"].status == "stopped"
    assert "stop b: accepted" in browser.find_element(By.ID, "message").text
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'button[data-op="resume"][data-run="b"]').is_enabled())
    assert not stop_b.is_enabled()

    # The clone form: parent c, overrides as key=value lines, a name; the child appears with its parent.
    Select(browser.find_element(By.ID, "clone-parent")).select_by_value("c")
    overrides = browser.find_element(By.ID, "clone-overrides")
    overrides.send_keys("learning_rate=5e-4\npeft_config.lora_alpha=16")
    browser.find_element(By.ID, "clone-warm").click()
    browser.find_element(By.ID, "clone-name").send_keys("c-warm")
    browser.find_element(By.ID, "clone-submit").click()
    wait.until(lambda d: "c-warm" in rows(d))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-run="c-warm"] [data-field="parent"]').text == "c")
    assert "new run c-warm" in browser.find_element(By.ID, "message").text
    spec = live.trainer.runs["c-warm"].spec
    assert spec.args.learning_rate == 5e-4 and spec.peft_config.lora_alpha == 16 and spec.summary["warm_start"]

    # Loss curves: every run has train points, and the canvas is not blank.
    wait.until(
        lambda d: d.execute_script("return ['a', 'b', 'c'].every((n) => S.curves[n] && S.curves[n].train.size > 3)")
    )
    wait.until(lambda d: d.execute_script("return S.curves.c && S.curves.c.eval.size > 0"))
    colored = browser.execute_script(
        "const c = document.getElementById('train-chart'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) if (d[i + 3] && Math.abs(d[i] - d[i + 2]) > 60) n++; return n;"
    )
    assert colored > 200

    # The picture for the README: the whole page, from the top, overrides typed in for the next clone.
    browser.find_element(By.ID, "clone-overrides").clear()
    browser.find_element(By.ID, "clone-overrides").send_keys("learning_rate=5e-4\npeft_config.r=16")
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    browser.set_window_size(1280, 1180)
    time.sleep(1.2)  # one more poll, so the picture shows the latest points

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < shot.stat().st_size < 300_000
    if os.environ.get("RF_UPDATE_SCREENSHOT"):  # refresh the README's picture: RF_UPDATE_SCREENSHOT=1 make test
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "dashboard.png")
