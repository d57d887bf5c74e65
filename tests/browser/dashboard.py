#!/usr/bin/env python3
"""The dashboard in a real browser: headless Chromium driven by selenium
through chromium-driver, against an isolated apm daemon.

Checks that the page loads without console errors and lists the workers,
that clicking restart changes the instance's pid, that a line the worker
prints reaches the live log within 2 s, that each custom panel type
renders, that with a password the page is refused without it, and that a
form on another site cannot make the browser act. Screenshots (desktop and
phone width, light and dark) go to target/browser/ for a person to look at.

Run by `cargo test` (tests/it/browser.rs) with the venv .ci/run makes:
    python3 -m venv target/dashboard-venv
    target/dashboard-venv/bin/pip install selenium
Usage: target/dashboard-venv/bin/python tests/browser/dashboard.py --apm target/debug/apm
Exit 0 when all holds; otherwise what failed, and exit 1.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHOTS = os.path.join(ROOT, "target", "browser")
PATIENCE = 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, condition, deadline=PATIENCE, every=0.05):
    end = time.time() + deadline
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class Apm:
    def __init__(self, binary, root):
        self.binary = binary
        self.root = root
        self.env = dict(os.environ, APM_HOME=os.path.join(root, "home"),
                        APM_SOCKET=f"apm-browser-{os.getpid()}", NO_COLOR="1")

    def __call__(self, *args):
        done = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"apm {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def load(self, text):
        path = os.path.join(self.root, "apm.conf")
        with open(path, "w") as f:
            f.write(text)
        self("load", path)


def browser(scheme="light"):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", f"--force-prefers-color-scheme={scheme}",
                     "--blink-settings=preferredColorScheme=" + ("0" if scheme == "dark" else "1")]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(options=options, service=service)


def console_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def pid_of(driver, instance):
    # Read in one script: the table is drawn again every poll.
    return driver.execute_script(
        "const cell = document.querySelector(`tr[data-instance='${arguments[0]}'] td.pid`);"
        "return cell ? cell.textContent : null;", instance)


def asks_password(url):
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError as e:
        return e.code == 401 and "Basic" in (e.headers.get("WWW-Authenticate") or "")
    except OSError:
        pass
    return False


def shoot(driver, name):
    os.makedirs(SHOTS, exist_ok=True)
    driver.save_screenshot(os.path.join(SHOTS, name + ".png"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apm", default=os.path.join(ROOT, "target", "debug", "apm"))
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="apm-browser-")
    apm = Apm(os.path.abspath(args.apm), root)
    gui = free_port()
    failures = []
    driver = None
    try:
        apm.load(f"daemon {{ gui_port {gui}; gui_bind 127.0.0.1; }}\n"
                 "worker { name talker; exec sh; params -c, \"trap 'echo got-usr1' USR1; echo talker-ready; "
                 "while :; do sleep 0.1; done\"; startup_grace 100; }\n"
                 "worker { name quiet; exec sleep; params 100000; instances 2; startup_grace 100; }\n")
        wait("the GUI", lambda: socket.create_connection(("127.0.0.1", gui), timeout=0.2).close() or True)
        token = open(os.path.join(apm.env["APM_HOME"], "gui.token")).read().strip()
        url = f"http://127.0.0.1:{gui}/?token={token}"

        driver = browser()
        driver.get(url)
        # It lists the workers and their instances.
        wait("the workers listed", lambda: pid_of(driver, "talker#0") not in (None, "", "-")
             and pid_of(driver, "quiet#1") not in (None, "", "-"))
        first = pid_of(driver, "talker#0")

        # The live log: a line the worker prints arrives within 2 s.
        driver.find_element(By.XPATH, '//a[@class="name" and text()="talker"]').click()
        log = driver.find_element(By.ID, "log")
        wait("the log's last lines", lambda: "talker-ready" in log.text)
        signalled = time.time()
        apm("SIGUSR1", "talker")
        wait("the printed line in the live log", lambda: "got-usr1" in log.text, every=0.02)
        took = time.time() - signalled
        if took > 2:
            failures.append(f"the printed line took {took:.2f} s to show (> 2 s)")
        wait("the effective config", lambda: "trap" in driver.find_element(By.ID, "config").text)

        # Clicking restart changes the pid, and the restart is in the history.
        driver.find_element(By.CSS_SELECTOR, 'button[data-worker="talker"][data-verb="restart"]').click()
        wait("a new pid", lambda: pid_of(driver, "talker#0") not in (None, "", "-", first))
        wait("the restart in the history",
             lambda: "killed by SIG" in driver.find_element(By.ID, "exits").text)

        # An instance's own restart button changes its pid alone.
        quiet = {i: pid_of(driver, f"quiet#{i}") for i in (0, 1)}
        driver.find_element(
            By.CSS_SELECTOR, 'button[data-worker="quiet"][data-instance="1"][data-verb="restart"]').click()
        wait("a new pid for quiet#1", lambda: pid_of(driver, "quiet#1") not in (None, "", "-", quiet[1]))
        if pid_of(driver, "quiet#0") != quiet[0]:
            failures.append(f"restarting quiet#1 changed quiet#0's pid ({quiet[0]} -> {pid_of(driver, 'quiet#0')})")

        # Each panel type renders from values as a connector sends them.
        types = driver.execute_script("""
            renderPanels({name: "talker", instances: [{index: 0, cpu_percent: 12.5, memory_bytes: 1048576, dash: {
              load: {value: {type: "gauge", value: 40, max: 80, unit: "%"}, color: "#4f8cff"},
              jobs: {value: 7, color: null},
              queue: {value: [1, 4, 2, 8], color: "#ff6b6b"},
              healthy: {value: true, color: "#4cc38a"},
              motd: {value: "all good", color: null},
              hot: {value: [[1, 2], [3, 4]], color: "#f5c04f"},
              cpu: {value: {type: "graph", source: "cpu"}, color: null},
              written: {value: {type: "counter", source: "iow", unit: " B/s"}, color: null}}}]});
            return [...document.querySelectorAll("#panels .panel")].map(p => p.dataset.panel + ":" + p.dataset.type);
        """)
        expected = ["load:gauge", "jobs:counter", "queue:graph", "healthy:led", "motd:text", "hot:heatmap", "cpu:graph",
                    "written:counter"]
        if types != expected:
            failures.append(f"panels {types}, expected {expected}")
        if "12.5" not in driver.find_element(By.CSS_SELECTOR, '[data-panel="cpu"]').text:
            failures.append("the cpu-sourced panel does not show the instance's CPU")
        # `iow` is the rate of the selected worker's storage writes, sampled
        # from /api/workers/NAME/io each poll: a number once two samples are in.
        wait("the iow panel's rate", lambda: driver.execute_script(
            "return sourced('iow', {index: 0}, {name: 'talker'})") is not None)
        shoot(driver, "dashboard-desktop-light")
        errors = console_errors(driver)
        if errors:
            failures.append(f"console errors: {errors}")
        driver.set_window_size(390, 844)
        width = driver.execute_script("return document.documentElement.scrollWidth")
        if width > 400:
            failures.append(f"at phone width the page is {width} px wide")
        shoot(driver, "dashboard-phone-light")
        driver.quit()

        dark = browser("dark")
        driver = dark
        driver.get(url)
        wait("the workers listed (dark)", lambda: pid_of(driver, "quiet#0") not in (None, "", "-"))
        background = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        if background != "rgb(15, 17, 21)":
            failures.append(f"the dark scheme's background is {background}")
        shoot(driver, "dashboard-desktop-dark")

        # With a password, the page is refused without it.
        apm.load(f"daemon {{ gui_port {gui}; gui_bind 127.0.0.1; gui_password s3cret; }}\n"
                 "worker { name quiet; exec sleep; params 100000; instances 2; startup_grace 100; }\n")
        plain = f"http://127.0.0.1:{gui}/"
        wait("the GUI to ask for its password", lambda: asks_password(plain))
        driver.get(plain)
        # Headless Chromium answers the password prompt with nothing: the
        # page stays empty (or shows the refusal's text), never the dashboard.
        if driver.find_elements(By.ID, "rows") or "apm GUI needs its token" in driver.page_source:
            failures.append("without the password the page was not refused: " + driver.page_source[:300])
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": "Basic OnMzY3JldA=="}})
        driver.get(plain)
        wait("the page with the password", lambda: pid_of(driver, "quiet#0") not in (None, "", "-"))
        quiet = pid_of(driver, "quiet#0")

        # A form of another site posts to the dashboard with the browser's
        # credentials: refused, nothing stopped.
        driver.get("data:text/html,<form id=f method=post action='" + plain + "api/workers/quiet/stop'>"
                   "<input name=x value=1></form><script>document.getElementById('f').submit()</script>")
        wait("the forged post's answer", lambda: "X-Apm-Gui" in driver.page_source)
        status = apm("info", "quiet")
        if "stopped" in status.split("\n", 3)[0] or quiet not in status:
            failures.append(f"the cross-site post stopped the worker: {status}")
    except AssertionError as e:
        failures.append(str(e))
        if driver:
            shoot(driver, "failure")
    finally:
        if driver:
            driver.quit()
        subprocess.run([apm.binary, "exit", "daemon"], env=apm.env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    if failures:
        print("dashboard in a browser: FAILED\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("dashboard in a browser: all checks passed; screenshots in " + SHOTS)


if __name__ == "__main__":
    main()
