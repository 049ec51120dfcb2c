"""Comms and Jupyter widgets through the tunnel, and a slider in JupyterLab in a real browser.

Widgets are comm messages both ways: the frontend opens or updates a model with
``comm_msg`` on shell, the kernel answers and pushes changes on iopub. The guest
image carries ipywidgets (guest/image/requirements.txt), the host JupyterLab the
matching widget manager (the ``[lab]`` extra).

``JSB_TEST_IMAGE=NAME`` runs these tests on another built image than the default
``python3`` (through kernelspecs naming it), to try an image recipe before it
replaces the default one.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BACKENDS, KERNEL, execute, require_sandbox, skip_or_fail
from helpers import sandboxes_of
from test_server import JupyterServer, KernelSocket, stdout

from provisioner.images.store import DEFAULT_IMAGE

REPO = Path(__file__).resolve().parent.parent
TEST_IMAGE = os.environ.get("JSB_TEST_IMAGE", DEFAULT_IMAGE)
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",  # we are root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def kernelspecs_for(image: str, jupyter_path: Path) -> Path:
    """Copies of the project's kernelspecs whose provisioner config names `image`."""
    for name in BACKENDS.values():
        spec = json.loads((REPO / "kernelspecs" / name / "kernel.json").read_text())
        spec["metadata"]["kernel_provisioner"]["config"]["image"] = image
        folder = jupyter_path / "kernels" / name
        folder.mkdir(parents=True)
        (folder / "kernel.json").write_text(json.dumps(spec))
    return jupyter_path


@pytest.fixture
def image_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The JUPYTER_PATH that selects TEST_IMAGE (nothing to set for the default image)."""
    if TEST_IMAGE == DEFAULT_IMAGE:
        return {}
    path = str(kernelspecs_for(TEST_IMAGE, tmp_path / "jupyter-path"))
    monkeypatch.setenv("JUPYTER_PATH", path)
    return {"JUPYTER_PATH": path}


@pytest.fixture(params=list(BACKENDS))
def kernel_name(request: pytest.FixtureRequest, image_path: dict[str, str]) -> str:
    """Each backend's kernelspec in turn, on TEST_IMAGE (overrides conftest's)."""
    require_sandbox(request.param)
    return BACKENDS[request.param]


async def iopub_until(kc, match: Callable[[dict], bool], timeout: float = 60) -> dict:
    """The first iopub message `match` accepts, skipping others; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no matching iopub message in time"
        msg = await kc.get_iopub_msg(timeout=left)
        if match(msg):
            return msg


def comm_msg(msg: dict, comm_id: str, msg_type: str = "comm_msg") -> bool:
    return msg["msg_type"] == msg_type and msg["content"]["comm_id"] == comm_id


def send_shell(kc, msg_type: str, content: dict) -> None:
    kc.shell_channel.send(kc.session.msg(msg_type, content))


async def test_comms_and_a_widget_both_ways(kc) -> None:
    """Comms opened from either side carry messages both ways; an IntSlider's state
    follows a frontend's update into the kernel and a kernel's change out to it."""
    reply, _, _ = await execute(
        kc,
        "import comm\n"
        "received = []\n"
        "def on_open(c, msg):\n"
        "    received.append(msg['content']['data'])\n"
        "    def on_msg(m):\n"
        "        received.append(m['content']['data'])\n"
        "        c.send({'echo': m['content']['data']})\n"
        "    c.on_msg(on_msg)\n"
        "    c.send({'opened': msg['content']['data']})\n"
        "comm.get_comm_manager().register_target('jsb-echo', on_open)\n",
    )
    assert reply["status"] == "ok", reply

    # a comm opened by the client: the kernel answers on iopub and echoes what it gets
    cid = uuid.uuid4().hex
    send_shell(kc, "comm_open", {"comm_id": cid, "target_name": "jsb-echo", "data": {"a": 1}})
    opened = await iopub_until(kc, lambda m: comm_msg(m, cid))
    assert opened["content"]["data"] == {"opened": {"a": 1}}
    send_shell(kc, "comm_msg", {"comm_id": cid, "data": {"n": 41}})
    echo = await iopub_until(kc, lambda m: comm_msg(m, cid))
    assert echo["content"]["data"] == {"echo": {"n": 41}}
    _, out, _ = await execute(kc, "print(received)")
    assert out.strip() == "[{'a': 1}, {'n': 41}]"

    # a comm opened by the kernel: the client sees the open and its messages reach the kernel
    _, _, messages = await execute(
        kc,
        "got = []\n"
        "k = comm.create_comm(target_name='jsb-host', data={'hello': 2})\n"
        "k.on_msg(lambda m: got.append(m['content']['data']))\n",
    )
    opens = [m for m in messages if m["msg_type"] == "comm_open"]
    assert [m["content"]["target_name"] for m in opens] == ["jsb-host"]
    assert opens[0]["content"]["data"] == {"hello": 2}
    kid = opens[0]["content"]["comm_id"]
    send_shell(kc, "comm_msg", {"comm_id": kid, "data": {"from": "host"}})
    send_shell(kc, "comm_close", {"comm_id": cid, "data": {}})
    # shell messages are handled in order: both are in before the next execute runs
    _, out, _ = await execute(kc, f"print(got, {cid!r} in comm.get_comm_manager().comms)")
    assert out.strip() == "[{'from': 'host'}] False"

    # a widget: the same protocol, as JupyterLab's widget manager speaks it
    _, _, messages = await execute(
        kc,
        "import ipywidgets as w\n"
        "s = w.IntSlider(value=10, min=0, max=100)\n"
        "seen = []\n"
        "s.observe(lambda change: seen.append(change['new']), names='value')\n"
        "display(s)\n",
    )
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    assert not errors, errors  # ModuleNotFoundError: No module named 'ipywidgets' before
    models = {
        m["content"]["data"]["state"]["_model_name"]: m["content"]["comm_id"]
        for m in messages
        if m["msg_type"] == "comm_open" and m["content"]["target_name"] == "jupyter.widget"
    }
    slider = models["IntSliderModel"]
    shown = [m for m in messages if m["msg_type"] == "display_data"]
    view = shown[0]["content"]["data"]["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == slider

    update = {"method": "update", "state": {"value": 33}, "buffer_paths": []}
    send_shell(kc, "comm_msg", {"comm_id": slider, "data": update})
    _, out, _ = await execute(kc, "print(s.value, seen)")
    assert out.strip() == "33 [33]"

    _, _, messages = await execute(kc, "s.value = 57")
    pushed = [m["content"]["data"] for m in messages if comm_msg(m, slider)]
    assert {"method": "update", "state": {"value": 57}, "buffer_paths": []} in pushed


# -- JupyterLab in a real browser ---------------------------------------------------


@pytest.fixture
def lab(no_leftovers: None, workspace: Path, tmp_path: Path, image_path: dict[str, str]):
    """A real jupyter_server with JupyterLab on loopback that fetches nothing from outside."""
    require_sandbox("gvisor")
    home = tmp_path / "server"
    server = JupyterServer(workspace, home, image_path)
    (home / "config" / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "LabApp": {
                    "news_url": None,
                    "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                    "extension_manager": "readonly",
                }
            }
        )
    )
    try:
        server.start(timeout=60)
        yield server
    finally:
        if server.process is not None:
            server.stop()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Debian's headless Chromium under chromedriver, with a fresh profile."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        skip_or_fail("chromium and chromium-driver are not installed (run `make browser`)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (it is in the [test] extra: run `make venv`)")

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="jsb-chromium-")
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(arg)
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


SLIDER_CELL = (
    "import ipywidgets as w\n"
    "seen = []\n"
    "s = w.IntSlider(value=10, min=0, max=100, description='jsb')\n"
    "s.observe(lambda change: seen.append(change['new']), names='value')\n"
    "s"
)


def wait_for(what: str, check: Callable[[], object], timeout: float = 60) -> object:
    """Poll `check` until it returns something true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def test_slider_in_jupyterlab_drives_the_kernel_and_back(
    lab: JupyterServer, browser, workspace: Path, tmp_path: Path
) -> None:
    """A slider moved in JupyterLab changes a kernel variable; a value set in the
    kernel moves the slider: comm messages both ways from a real browser."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "slider",
                "metadata": {},
                "outputs": [],
                "source": SLIDER_CELL,
            }
        ],
        "metadata": {"kernelspec": {"name": KERNEL, "display_name": KERNEL, "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (workspace / "widgets.ipynb").write_text(json.dumps(notebook))
    ws: KernelSocket | None = None

    def kernel_says(code: str) -> str:
        assert ws is not None
        reply, iopub = ws.execute(code)
        assert reply["status"] == "ok", reply
        return stdout(iopub).strip()

    def find(css: str) -> list:
        return browser.find_elements(By.CSS_SELECTOR, css)

    try:
        # JupyterLab starts the notebook's kernel itself, as for a user
        browser.get(f"{lab.url}/lab/tree/widgets.ipynb?token={lab.token}")
        wait_for(
            "JupyterLab to start the notebook's kernel",
            lambda: browser.execute_script(
                "const bar = document.querySelector('#jp-main-statusbar');"
                "return bar !== null && bar.innerText.includes('| Idle');"
            ),
        )
        sessions = lab.get("/api/sessions").json()
        assert [(s["path"], s["kernel"]["name"]) for s in sessions] == [("widgets.ipynb", KERNEL)]
        kernel_id = sessions[0]["kernel"]["id"]
        assert len(sandboxes_of(kernel_id)) == 1
        ws = KernelSocket(lab, kernel_id)  # the test's own view of the kernel
        run_cell = "[data-command='notebook:run-cell-and-select-next']"
        find(f".jp-NotebookPanel-toolbar {run_cell}")[0].click()

        def rendered() -> list:
            errors = find(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert not errors, errors[0].text  # ModuleNotFoundError: ... 'ipywidgets' before
            return find(".widget-slider .noUi-handle")

        handle = wait_for("the slider to render", rendered)[0]
        readout = find(".widget-slider .widget-readout")[0]
        assert readout.text == "10"
        assert kernel_says("print(s.value, seen)") == "10 []"

        # the browser moves the slider: three steps right with the keyboard
        handle.click()
        for _ in range(3):
            handle.send_keys(Keys.ARROW_RIGHT)
        wait_for("the slider's readout to say 13", lambda: readout.text == "13", timeout=10)
        # the widget manager sends one update at a time and merges those that wait, so
        # the kernel may skip a step; it must end at 13, having moved only upwards
        deadline = time.monotonic() + 30
        while not (said := kernel_says("print(s.value, seen)")).startswith("13 "):
            assert time.monotonic() < deadline, f"the kernel did not see 13: {said}"
            time.sleep(0.2)
        steps = ast.literal_eval(said.split(" ", 1)[1])
        assert steps[-1] == 13 and steps == sorted(set(steps)) and set(steps) <= {11, 12, 13}, said

        # the kernel moves the slider
        assert kernel_says("s.value = 42; print(s.value)") == "42"
        wait_for("the slider to show 42", lambda: readout.text == "42", timeout=30)
        assert handle.get_attribute("aria-valuenow") in {"42", "42.0"}
    except (AssertionError, WebDriverException):
        browser.save_screenshot(str(tmp_path / "jupyterlab.png"))
        raise
    finally:
        if ws is not None:
            ws.close()
        for session in lab.get("/api/sessions").json():
            assert lab.delete(f"/api/kernels/{session['kernel']['id']}").status_code == 204
