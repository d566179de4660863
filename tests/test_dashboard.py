"""The jobs dashboard at /ui, against a real uvicorn server training the tiny model: its access
rules over HTTP, then the page itself in headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium): log in, watch a running job's progress move, open a finished
job's curves, cancel a job. Screenshots go to the test's tmp_path."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from core import errors
from core.dashboard import COOKIE, csrf_token, new_session, session_nonce
from tests.service_helpers import wait_for
from tools.serve import Server
from tools.trigger import Client

pytestmark = pytest.mark.slow
TOKEN = "dashboard-token-for-tests-0123456789"
NO_JOB = "0" * 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("dashboard"), env={"DPO_DASHBOARD_TOKEN": TOKEN}) as srv:
        yield srv


def logged_in(server: Server) -> httpx.Client:
    browser = httpx.Client(base_url=server.url)
    response = browser.post("/ui/login", data={"token": TOKEN})
    assert response.status_code == 303 and response.headers["location"] == "/ui"
    return browser


def test_a_session_cookie_is_signed_by_the_token_and_expires():
    cookie = new_session(TOKEN, 60, now=1000)
    nonce = session_nonce(TOKEN, cookie, now=1000)
    assert nonce is not None
    assert session_nonce(TOKEN, cookie, now=1061) is None  # expired
    assert session_nonce("another-token-0123456789", cookie, now=1000) is None  # the token changed
    expires, nonce_, mac = cookie.split(".")
    assert session_nonce(TOKEN, f"{int(expires) + 3600}.{nonce_}.{mac}", now=1000) is None  # lifetime edited
    assert session_nonce(TOKEN, "garbage", now=1000) is None
    assert csrf_token(TOKEN, nonce) != csrf_token(TOKEN, "other") and len(csrf_token(TOKEN, nonce)) == 64


def test_the_dashboard_is_off_without_a_token(tmp_path):
    with Server(tmp_path) as plain:
        for path in ("/ui", "/ui/api/jobs", "/ui/static/dashboard.js"):
            assert httpx.get(plain.url + path).status_code == 404, path
        assert httpx.post(plain.url + "/ui/login", data={"token": TOKEN}).status_code == 404


def test_a_short_dashboard_token_is_refused():
    from core.settings import Settings

    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(webhook_secret="s", dashboard_token="short")


def test_a_guessable_dashboard_token_is_refused_at_start(tmp_path):
    """Issue 24.7: 16 characters are not enough when they repeat: at least 6 different ones and
    an estimated 36 bits (length x the Shannon entropy of its characters)."""
    from core.settings import Settings, token_entropy_bits

    for weak in ("aaaaaaaaaaaaaaaa", "abababababababababab", "aaaaaaaaaaaaaaaaaaaaaaab", "abcdeabcdeabcdeabcde"):
        with pytest.raises(ValueError, match="too guessable"):
            Settings(webhook_secret="s", dashboard_token=weak)
    assert Settings(webhook_secret="s", dashboard_token=TOKEN).dashboard_token is not None
    assert token_entropy_bits("0123456789abcdef") == 64 and token_entropy_bits("a" * 40) == 0
    srv = Server(tmp_path, env={"DPO_DASHBOARD_TOKEN": "a" * 16})
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start(timeout_s=30)
    assert srv.log_tail(n=1).startswith("invalid settings, refusing to start: DPO_DASHBOARD_TOKEN: too guessable")
    assert "a" * 16 not in srv.log_tail()  # the value is never echoed


def client_at(address: str) -> dict:
    """A client seen at `address`: uvicorn believes X-Forwarded-For from its trusted proxies
    (FORWARDED_ALLOW_IPS, loopback by default), and these tests connect over loopback."""
    return {"X-Forwarded-For": address}


def test_failed_logins_are_limited_per_client_and_in_all_and_logged(tmp_path):
    """Issue 24.7: past DPO_DASHBOARD_LOGIN_FAILURES failed logins a minute a client gets 429 with
    Retry-After (even with the right token: nothing is compared), other clients go on until
    DPO_DASHBOARD_LOGIN_FAILURES_GLOBAL; each failure is a WARNING naming the client, not the token."""
    env = {
        "DPO_DASHBOARD_TOKEN": TOKEN,
        "DPO_DASHBOARD_LOGIN_FAILURES": "3",
        "DPO_DASHBOARD_LOGIN_FAILURES_GLOBAL": "5",
    }
    with Server(tmp_path, env=env) as srv:
        anyone = httpx.Client(base_url=srv.url)
        guesses = [f"guess-{i}-0123456789abcdef" for i in range(6)]
        for guess in guesses[:3]:
            wrong = anyone.post("/ui/login", data={"token": guess}, headers=client_at("203.0.113.1"))
            assert wrong.status_code == 303 and wrong.headers["location"] == "/ui?login=failed"
        limited = anyone.post("/ui/login", data={"token": TOKEN}, headers=client_at("203.0.113.1"))
        assert limited.status_code == 429 and COOKIE not in limited.cookies
        retry_after = int(limited.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        assert errors.LOGIN_LIMITED.format(retry_after=retry_after) in limited.text
        assert limited.headers["content-security-policy"].startswith("default-src 'self'")

        other = anyone.post("/ui/login", data={"token": TOKEN}, headers=client_at("203.0.113.2"))
        assert other.status_code == 303 and other.headers["location"] == "/ui"  # another client logs in
        for guess in guesses[3:5]:  # 5 failures in all: the global limit
            assert anyone.post("/ui/login", data={"token": guess}, headers=client_at("203.0.113.3")).status_code == 303
        fresh = httpx.post(srv.url + "/ui/login", data={"token": TOKEN}, headers=client_at("203.0.113.4"))
        assert fresh.status_code == 429 and 1 <= int(fresh.headers["Retry-After"]) <= 60
    log = srv.log_path.read_text()
    failed = [line for line in log.splitlines() if "dashboard login failed" in line]
    assert len(failed) == 5 and all(" WARNING " in line for line in failed), failed
    assert "dashboard login failed from 203.0.113.1 (3 of 3 allowed a minute; further logins refused" in log
    assert not any(guess in log for guess in guesses) and TOKEN not in log


def test_forwarded_headers_are_believed_only_from_trusted_proxies(tmp_path):
    """Issue 24.9: X-Forwarded-For counts only from a proxy in FORWARDED_ALLOW_IPS (uvicorn's own
    setting, honoured however the service is started), so a client cannot spread its failed
    logins over made-up addresses; X-Forwarded-Host is never believed by the Origin check."""
    env = {"DPO_DASHBOARD_TOKEN": TOKEN, "DPO_DASHBOARD_LOGIN_FAILURES": "2", "FORWARDED_ALLOW_IPS": "192.0.2.10"}
    with Server(tmp_path, env=env) as srv:
        anyone = httpx.Client(base_url=srv.url)
        for i in range(2):
            answer = anyone.post("/ui/login", data={"token": f"guess-{i}"}, headers=client_at(f"198.51.100.{i}"))
            assert answer.status_code == 303
        spread = anyone.post("/ui/login", data={"token": "guess-2"}, headers=client_at("198.51.100.99"))
        assert spread.status_code == 429  # all three came from 127.0.0.1, whatever they claimed
    assert "dashboard login failed from 127.0.0.1 (2 of 2" in srv.log_path.read_text()


def test_login_sets_an_httponly_strict_session_cookie_and_a_wrong_token_does_not(server):
    anonymous = httpx.Client(base_url=server.url)
    page = anonymous.get("/ui")
    assert page.status_code == 200 and 'action="/ui/login"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    wrong = anonymous.post("/ui/login", data={"token": TOKEN[:-1] + "x"})
    assert wrong.status_code == 303 and wrong.headers["location"] == "/ui?login=failed"
    assert COOKIE not in wrong.cookies and "Wrong token." in anonymous.get("/ui?login=failed").text

    right = anonymous.post("/ui/login", data={"token": TOKEN})
    cookie = right.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert "secure" not in cookie  # plain http on loopback; Secure over https (DPO_PUBLIC_BASE_URL)
    page = anonymous.get("/ui")
    assert 'name="csrf-token"' in page.text and server.secret not in page.text  # no webhook secret


def test_the_dashboard_api_needs_a_session_and_changes_need_the_csrf_token(server, toy):
    anonymous = httpx.Client(base_url=server.url)
    answer = anonymous.get("/ui/api/jobs")
    assert answer.status_code == 401 and answer.json()["error"]["message"] == errors.LOGIN_REQUIRED
    forged = anonymous.get("/ui/api/jobs", cookies={COOKIE: new_session("a-guessed-token-0123456", 60)})
    assert forged.status_code == 401

    browser = logged_in(server)
    job_id = Client(server.url, server.secret).trigger("dash-csrf", toy(256), {"epochs": 20}).json()["job_id"]
    assert browser.get("/ui/api/jobs", params={"community": "dash-csrf"}).json()["jobs"][0]["job_id"] == job_id
    assert browser.get(f"/ui/api/jobs/{NO_JOB}").status_code == 404
    assert browser.get("/ui/api/jobs", params={"status": "nope"}).status_code == 422

    nonce = session_nonce(TOKEN, browser.cookies[COOKIE])
    no_csrf = browser.post(f"/ui/api/jobs/{job_id}/cancel")
    assert no_csrf.status_code == 403 and no_csrf.json()["error"]["message"] == errors.BAD_CSRF
    other_origin = browser.post(
        f"/ui/api/jobs/{job_id}/cancel",
        headers={"X-CSRF-Token": csrf_token(TOKEN, nonce), "Origin": "https://evil.example"},
    )
    assert other_origin.status_code == 403 and other_origin.json()["error"]["message"] == errors.CROSS_ORIGIN
    # the dashboard cannot start a job, and its session is no credential for the signed API
    assert browser.post("/ui/api/trigger-finetune", json={}).status_code in (404, 405)
    assert browser.get(f"/jobs/{job_id}").status_code == 401

    ok = browser.post(f"/ui/api/jobs/{job_id}/cancel", headers={"X-CSRF-Token": csrf_token(TOKEN, nonce)})
    assert ok.status_code == 200, ok.text
    assert wait_for(Client(server.url, server.secret), job_id)["status"] == "cancelled"

    logout = browser.post("/ui/logout", headers={"X-CSRF-Token": csrf_token(TOKEN, nonce)})
    assert logout.status_code == 204 and COOKIE not in browser.cookies
    assert browser.get("/ui/api/jobs").status_code == 401


def test_hostile_logins_and_cookies_get_clear_answers_not_crashes(server):
    anonymous = httpx.Client(base_url=server.url)

    def chunks():  # no Content-Length: the gate cannot refuse it up front
        yield b"token="
        for _ in range(64):
            yield b"x" * 1024

    too_big = anonymous.post(
        "/ui/login", content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    odd = {"Cookie": f"{COOKIE}=1.a.".encode() + b"\xe9"}  # not ASCII: treated as no session
    assert anonymous.get("/ui/api/jobs", headers=odd).status_code == 401
    assert anonymous.get("/ui", headers=odd).status_code == 200

    browser = logged_in(server)
    answer = browser.get("/ui/api/jobs")
    assert answer.headers["cache-control"] == "no-store"
    csrf = csrf_token(TOKEN, session_nonce(TOKEN, browser.cookies[COOKIE]))
    assert browser.post("/ui/logout", headers={"X-CSRF-Token": b"\xe9" * 64}).status_code == 403
    claimed_by_anyone = {  # issue 24.9: X-Forwarded-Host is anyone's to send: never believed
        "X-CSRF-Token": csrf,
        "Origin": "https://evil.example",
        "X-Forwarded-Host": "evil.example",
    }
    refused = browser.post("/ui/logout", headers=claimed_by_anyone)
    assert refused.status_code == 403 and refused.json()["error"]["message"] == errors.CROSS_ORIGIN
    assert browser.post("/ui/logout", headers={"X-CSRF-Token": csrf}).status_code == 204


def test_allowed_hosts_refuse_a_rebound_name_but_not_the_probes(tmp_path):
    """Issue 24.9: DNS rebinding points the attacker's own name at the service, so Origin and Host
    agree and the Origin check passes; with DPO_ALLOWED_HOSTS a request to another Host is a 400
    (the probes excepted: load balancers call them by address). A proxy that rewrites Host still
    works: the browser's Origin is an allowed name."""
    env = {"DPO_DASHBOARD_TOKEN": TOKEN, "DPO_ALLOWED_HOSTS": "127.0.0.1,dpo.example.com"}
    with Server(tmp_path, env=env) as srv:
        rebound = {"Host": "rebound.evil.example", "Origin": "http://rebound.evil.example"}
        login = httpx.post(srv.url + "/ui/login", data={"token": TOKEN}, headers=rebound)
        assert login.status_code == 400 and COOKIE not in login.cookies
        assert login.json()["error"] == {"code": "bad_host", "message": errors.BAD_HOST}
        assert login.headers["x-content-type-options"] == "nosniff"
        for path in ("/ui", "/ui/api/jobs", "/docs", "/openapi.json", "/jobs"):
            assert httpx.get(srv.url + path, headers={"Host": "rebound.evil.example"}).status_code == 400, path
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(srv.url + path, headers={"Host": "10.1.2.3:8000"}).status_code == 200, path
        assert httpx.get(srv.url + "/docs", headers={"Host": "DPO.example.com:443"}).status_code == 200
        behind_a_proxy = {"Origin": "https://dpo.example.com"}  # Host: the proxy's upstream, 127.0.0.1:<port>
        session = httpx.post(srv.url + "/ui/login", data={"token": TOKEN}, headers=behind_a_proxy)
        assert session.status_code == 303 and COOKIE in session.cookies


# -- in a real browser ---------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = "needs Debian's chromium and chromium-driver: `apt-get install chromium chromium-driver` (.ci/run does)"


@pytest.fixture
def chrome(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (  # headless, and quiet on a machine without outside network (no background calls)
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are console errors
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def until(condition, timeout_s: float = 60, what: str = "condition"):
    """condition()'s first true value; an element the page re-rendered meanwhile (the list
    refreshes every few seconds), or one not there yet, counts as not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            value = condition()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def csp_violations(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def test_in_a_browser_docs_and_the_dashboard_work_under_their_csp(server, chrome):
    """Issue 24.11: /docs (the service's own Swagger UI) renders its operations under a CSP
    without 'unsafe-inline', from the service alone; the login page too; nothing is refused."""
    chrome.get(server.url + "/docs")
    until(lambda: len(chrome.find_elements("css selector", ".opblock")) >= 5, what="the operations")
    assert "DPO fine-tuning microservice" in chrome.find_element("css selector", ".info .title").text
    chrome.find_element("css selector", ".opblock-summary").click()  # an operation opens
    until(lambda: chrome.find_elements("css selector", ".opblock-body"), what="an operation's body")
    assert chrome.execute_script("return getComputedStyle(document.querySelector('.swagger-ui')).fontFamily")
    chrome.get(server.url + "/ui")
    until(lambda: chrome.find_element("id", "login").is_displayed(), what="the login page")
    assert csp_violations(chrome) == []


def click_row(driver, job_id: str) -> None:
    until(lambda: driver.find_element("css selector", f'tr[data-job="{job_id}"]').click() or True, what="a row")


def listed(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#jobs tr')].map(r => r.dataset.job)")


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def test_in_a_browser_log_in_follow_a_job_see_curves_and_cancel(server, chrome, toy, tmp_path):
    client = Client(server.url, server.secret)
    finished = client.trigger("dash-done", toy(64), {"epochs": 8, "batch_size": 8}).json()["job_id"]
    running = client.trigger("dash-running", toy(256), {"epochs": 40}).json()["job_id"]
    assert wait_for(client, finished)["status"] == "succeeded"

    chrome.get(server.url + "/ui")
    chrome.find_element("id", "token").send_keys(TOKEN)
    chrome.find_element("id", "login").click()
    until(lambda: running in listed(chrome), what="the jobs list")
    assert not chrome.execute_script("return document.cookie")  # the session cookie is HttpOnly

    # the finished job: its curves (a training line and held-out points) and its artifact files
    click_row(chrome, finished)
    until(lambda: text_of(chrome, "job-status") == "SUCCEEDED", what="the finished job")
    points = until(
        lambda: chrome.execute_script(
            "const l = document.querySelector('#chart-loss polyline.train');"
            " return l && l.getAttribute('points').split(' ').length;"
        ),
        what="the loss curve",
    )
    assert points >= 2
    assert chrome.find_elements("css selector", "#chart-accuracy circle.eval")  # held-out accuracy
    files = text_of(chrome, "job-files")
    assert "model.safetensors" in files or "adapter_model.safetensors" in files, files
    assert chrome.find_element("id", "cancel").is_displayed() is False
    chrome.save_screenshot(str(tmp_path / "finished-job.png"))

    # the running job: its progress moves while the page is open
    click_row(chrome, running)
    until(lambda: text_of(chrome, "job-status") == "RUNNING", what="the running job")

    def step() -> int:
        words = text_of(chrome, "job-progress").split()
        return int(words[1]) if len(words) > 1 and words[1].isdigit() else -1

    first = until(lambda: step() > 0 and step(), what="a first step")
    until(lambda: step() > first, what="the progress to move")
    chrome.save_screenshot(str(tmp_path / "running-job.png"))

    # cancel it from the page
    chrome.find_element("id", "cancel").click()
    until(lambda: text_of(chrome, "job-status") == "CANCELLED", timeout_s=90, what="the cancel")
    assert client.get(f"/jobs/{running}").json()["status"] == "cancelled"
    until(lambda: not chrome.find_element("id", "cancel").is_displayed(), what="the cancel button to go")
    chrome.save_screenshot(str(tmp_path / "cancelled-job.png"))
    assert all(os.path.getsize(tmp_path / f) > 1000 for f in ("finished-job.png", "cancelled-job.png"))

    # the filter narrows the list
    chrome.find_element("id", "filter-community").send_keys("dash-done")
    chrome.find_element("css selector", "#filters button").click()
    until(lambda: listed(chrome) == [finished], what="the filtered list")
