"""Kernels from any environment: imported images, their kernelspecs, any language.

Real parts throughout: images built with `jupyter sandbox image build NAME --from`
(a docker-archive made with skopeo; a Debian root with R and no Python), kernelspecs
written by `jupyter sandbox kernelspec install`, kernels started by jupyter_client,
notebooks run by nbclient, the R kernel reached through a real jupyter_server's REST
and websocket API, and IRkernel checked by the public conformance suite
(jupyter_kernel_test) in the sandbox and locally.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import unittest
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from conftest import BACKENDS, READY_TIMEOUT, execute, require_sandbox, skip_or_fail
from images_kit import MARKER, build, kernelspecs, remove, sandbox_cli
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from nbclient import NotebookClient
from provisioner.guest.layout import AGENT_PYTHON

from provisioner.images.store import find_image, image_dir, load_manifest

pytestmark = pytest.mark.timeout(1800)
COURSE = "jsb-test-course"


@pytest.fixture(scope="module")
def r_kernels(r_image: str, kernel_prefix: Path) -> dict[str, str]:
    """The R image's kernel installed for each backend: backend -> kernelspec name."""
    names = {}
    for backend in BACKENDS:
        [name] = kernelspecs(r_image, kernel_prefix, "--backend", backend, "--workspace=none")
        names[backend] = name
    return names


@pytest.fixture(scope="module")
def imported_kernel(imported_image: str, kernel_prefix: Path) -> str:
    [name] = kernelspecs(imported_image, kernel_prefix, "--kernel", "python3")
    return name


def test_an_image_without_python_lists_its_kernel_and_carries_the_agents_runtime(
    r_image: str,
) -> None:
    rootfs = find_image(r_image)
    manifest = load_manifest(r_image)
    assert manifest["kernels"]["ir"]["argv"][0] == "R"
    assert manifest["kernels"]["ir"]["language"] == "R"
    assert manifest["source"]["kind"] == "rootfs"
    assert not os.path.lexists(rootfs / "usr/bin/python3")  # the image has no Python
    assert (rootfs / AGENT_PYTHON.lstrip("/")).is_file()  # the agent brings its own


def test_kernelspec_install_names_the_image_backend_and_limits(
    r_image: str, r_kernels: dict[str, str], kernel_prefix: Path
) -> None:
    spec = json.loads((kernel_prefix / "share/jupyter/kernels" / r_kernels["microvm"]
                       / "kernel.json").read_text())  # fmt: skip
    assert spec["display_name"] == f"R (microVM sandbox, {r_image})"
    # the program as its path in the image (jupyter_client would replace a bare "python")
    assert spec["argv"] == ["/usr/bin/R", *load_manifest(r_image)["kernels"]["ir"]["argv"][1:]]
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "microvm-provisioner",
        "config": {"image": r_image, "workspace": "none"},
    }
    assert "HOME" not in spec["env"] and spec["env"]["PATH"].startswith("/usr/local/sbin")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kernel", "julia"], "has no kernel 'julia'; it has: ir"),
        (["--backend", "docker"], "no sandbox backend 'docker'"),
        (["--memory-limit=lots"], "invalid memory_limit"),
        (["--cpu-limit=-1"], "invalid cpu_limit"),
    ],
)
def test_kernelspec_install_refuses_what_it_cannot_write(
    r_image: str, tmp_path: Path, args: list[str], message: str
) -> None:
    done = sandbox_cli("kernelspec", "install", "--image", r_image, "--prefix", str(tmp_path),
                       *args, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert message in done.stderr
    assert not (tmp_path / "share").exists()


async def test_a_kernel_on_an_imported_image(
    no_leftovers: None, workspace: Path, imported_image: str, imported_kernel: str
) -> None:
    """The imported image's own layer is there, and the kernel is what it is on the
    default image: the kernel's user, no capabilities, no_new_privs, a read-only root."""
    km = AsyncIOLoopKernelManager(kernel_name=imported_kernel)
    await km.start_kernel(cwd=str(workspace))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=READY_TIMEOUT)
        code = (
            f"import ctypes, os; print(open({MARKER!r}).read().strip()); "
            "print(os.getuid(), os.getgid()); s = open('/proc/self/status').read(); "
            "print([l.split()[1] for l in s.splitlines() if l.startswith('CapEff')]); "
            "print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))"  # PR_GET_NO_NEW_PRIVS
        )
        reply, text, _ = await execute(kc, code)
        assert reply["status"] == "ok", reply
        lines = text.splitlines()
        assert lines == ["from the test's own layer", "1000 1000", "['0000000000000000']", "1"]
        assert km.provisioner.image == imported_image
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


async def test_an_image_in_use_is_not_removed(
    no_leftovers: None, workspace: Path, imported_image: str, imported_kernel: str
) -> None:
    km = AsyncIOLoopKernelManager(kernel_name=imported_kernel)
    await km.start_kernel(cwd=str(workspace))
    try:
        done = sandbox_cli("image", "rm", imported_image, timeout=120)
        assert done.returncode == 1
        assert (
            f"image {imported_image!r} is in use by 1 kernel(s) ({km.kernel_id}) and cannot "
            "be removed" in done.stderr
        )
        assert find_image(imported_image)  # untouched
        listing = sandbox_cli("image", "ls", timeout=60).stdout.splitlines()
        [row] = [line for line in listing if line.startswith(imported_image + " ")]
        assert row.split()[-1] == "1"  # IN USE
    finally:
        await km.shutdown_kernel(now=True)
    assert "no image 'no-such-image'" in sandbox_cli("image", "rm", "no-such-image").stderr
    default = sandbox_cli("image", "rm", "python3", timeout=60)
    assert default.returncode == 1 and "python3 is the default image" in default.stderr
    assert find_image("python3")


# -- R ---------------------------------------------------------------------------------

R_NOTEBOOK = [
    "x <- c(3, 1, 2)\ncat(sort(x), sep = ',')",
    "df <- data.frame(n = 1:3, sq = (1:3)^2)\nprint(df$sq)",
    "cat(Sys.getenv('HOME'), as.integer(system('id -u', intern = TRUE)), getwd(), sep = '|')",
    "stop('on purpose')",
]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_r_notebook_runs_through_nbclient(
    no_leftovers: None, r_kernels: dict[str, str], backend: str
) -> None:
    require_sandbox(backend)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in R_NOTEBOOK]
    client = NotebookClient(nb, kernel_name=r_kernels[backend], timeout=120,
                            startup_timeout=READY_TIMEOUT, allow_errors=True)  # fmt: skip
    client.execute()
    text = ["".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")
            for cell in nb.cells]  # fmt: skip
    assert text[0] == "1,2,3"
    assert text[1].strip() == "[1] 1 4 9"
    assert text[2] == "/home/sandbox|1000|/home/sandbox"  # workspace none: its home
    [error] = nb.cells[3].outputs
    assert error["output_type"] == "error" and "on purpose" in error["evalue"]


def _conformance(kernel_name: str) -> unittest.TestResult:
    """jupyter_kernel_test's suite for IRkernel (as IRkernel's own tests define it),
    against `kernel_name`."""
    import jupyter_kernel_test

    class IRkernelTests(jupyter_kernel_test.KernelTests):
        language_name = "R"
        file_extension = ".r"
        code_hello_world = 'print("hello, world")'
        code_stderr = 'message("error")'
        completion_samples = [{"text": "zi", "matches": {"zip"}}]
        complete_code_samples = ["fun()", "1 + 2", "a %>% b", "a |> b()"]
        incomplete_code_samples = ["fun(", "1 + "]
        code_display_data = [  # IRkernel shows values as display_data, not execute_result
            {"code": "1 + 2", "mime": "text/plain"},
            {"code": 'IRdisplay::display_markdown("*a*")', "mime": "text/markdown"},
            {"code": 'IRdisplay::display_latex("$\\\\alpha$")', "mime": "text/latex"},
        ]
        code_inspect_sample = "print"
        code_generate_error = 'stop("oops")'
        code_clear_output = "IRdisplay::clear_output()"

    IRkernelTests.kernel_name = kernel_name
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(IRkernelTests)
    result = unittest.TestResult()
    suite.run(result)
    return result


def test_irkernel_passes_the_conformance_suite_in_the_sandbox_as_locally(
    no_leftovers: None, r_kernels: dict[str, str], workspace: Path, monkeypatch
) -> None:
    if shutil.which("R") is None:
        skip_or_fail("R is not installed on the host (make kernels): nothing to compare with")
    monkeypatch.chdir(workspace)
    local = _conformance("ir")
    sandboxed = _conformance(r_kernels["gvisor"])
    for result in (local, sandboxed):
        assert result.testsRun >= 10
        assert not result.failures and not result.errors, [
            (str(t), e[-600:]) for t, e in [*result.failures, *result.errors]
        ]
    assert sandboxed.testsRun == local.testsRun
    assert [str(t) for t, _ in sandboxed.skipped] == [str(t) for t, _ in local.skipped]


def test_an_r_kernel_through_jupyter_servers_rest_and_websocket_api(
    no_leftovers: None, r_image: str, kernel_prefix: Path, workspace: Path, tmp_path: Path
) -> None:
    """What JupyterLab does with an R kernelspec: list it, start it with the notebook's
    folder, execute over the websocket, and delete it; the kernel's file lands in the
    folder as the kernel's user."""
    from test_server import KernelSocket, jupyter_server, stdout

    [name] = kernelspecs(r_image, kernel_prefix, "--name", "r-lab")  # workspace rw
    with jupyter_server(workspace, tmp_path / "server",
                        JUPYTER_PATH=os.environ["JUPYTER_PATH"]) as server:  # fmt: skip
        spec = server.get("/api/kernelspecs").json()["kernelspecs"][name]["spec"]
        assert spec["display_name"] == f"R (gVisor sandbox, {r_image})"
        assert spec["language"] == "R"
        kernel_id = server.start_kernel(name)
        ws = KernelSocket(server, kernel_id)
        try:
            reply, iopub = ws.execute(
                "writeLines(paste('from R', R.version$major), 'from-r.txt')\n"
                "cat(getwd(), Sys.getenv('USER'), file.exists('/usr/bin/python3'))"
            )
            assert reply["status"] == "ok", reply
            assert stdout(iopub) == f"{workspace}  FALSE"
            written = workspace / "from-r.txt"
            assert written.read_text() == "from R 4\n"
            assert written.stat().st_uid == 1000
        finally:
            ws.close()
            assert server.delete(f"/api/kernels/{kernel_id}").status_code == 204


# -- a course's Binder folder: two commands to a sandboxed kernelspec ---------------

COURSE_POSTBUILD = """#!/bin/sh
set -e
python -m bash_kernel.install --sys-prefix
echo "built by postBuild" > /opt/course-marker
"""


@pytest.fixture(scope="module")
def course(kernel_prefix: Path) -> Iterator[dict[str, str]]:
    """What a teacher does: a course repository's binder/ folder (a PyPI package, a Debian
    package, a postBuild adding the bash kernel) built into an image, and its kernels
    installed as kernelspecs: kernel name -> kernelspec name."""
    require_sandbox()
    repo = Path(tempfile.mkdtemp(prefix="jsb-course-", dir="/var/tmp"))
    try:
        (repo / "binder").mkdir()
        (repo / "binder/requirements.txt").write_text("humanize\nbash_kernel\n")
        (repo / "binder/apt.txt").write_text("# tools the notebooks shell out to\njq\n")
        (repo / "binder/postBuild").write_text(COURSE_POSTBUILD)
        (repo / "binder/postBuild").chmod(0o755)
        (repo / "lesson-1.ipynb").write_text("{}")
        build(COURSE, str(repo))
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    try:
        installed = kernelspecs(COURSE, kernel_prefix)
        yield {name.split("-gvisor-")[0]: name for name in installed}
    finally:
        remove(COURSE)


def test_a_course_binder_folder_becomes_sandboxed_kernelspecs(course: dict[str, str]) -> None:
    manifest = load_manifest(COURSE)
    assert sorted(manifest["kernels"]) == ["bash", "python3"]
    assert manifest["source"]["kind"] == "binder"
    assert sorted(manifest["source"]["files"]) == ["apt.txt", "postBuild", "requirements.txt"]
    assert sorted(course) == ["bash", "python3"]


def test_a_course_notebook_imports_its_packages_in_the_sandbox(
    no_leftovers: None, course: dict[str, str], workspace: Path
) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import humanize\nprint(humanize.naturalsize(3 * 10**6))"),
        nbformat.v4.new_code_cell(
            "import subprocess\n"
            "print(subprocess.run(['jq', '-n', '6 * 7'], capture_output=True, text=True).stdout)"
        ),
        nbformat.v4.new_code_cell("print(open('/opt/course-marker').read())"),
    ]
    NotebookClient(nb, kernel_name=course["python3"], timeout=120,
                   startup_timeout=READY_TIMEOUT,
                   resources={"metadata": {"path": str(workspace)}}).execute()  # fmt: skip
    text = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells]
    assert text == ["3.0 MB\n", "42\n\n", "built by postBuild\n\n"]


def test_a_second_non_python_kernel_bash_from_the_course_image(
    no_leftovers: None, course: dict[str, str], workspace: Path
) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("echo $((6 * 7)) $(id -u) $(jq -n '1 + 1')")]
    NotebookClient(nb, kernel_name=course["bash"], timeout=120, startup_timeout=READY_TIMEOUT,
                   resources={"metadata": {"path": str(workspace)}}).execute()  # fmt: skip
    [out] = nb.cells[0].outputs
    assert out["text"].strip() == "42 1000 2"


def test_a_binder_image_over_the_size_limit_is_refused_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    require_sandbox()
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "postBuild").write_text("#!/bin/sh\nhead -c 50000000 /dev/zero > /opt/big\n")
    (folder / "postBuild").chmod(0o755)
    name = "jsb-test-too-big"
    done = sandbox_cli("image", "build", name, "--from", str(folder), "--max-size=600M")
    assert done.returncode == 1
    assert "image larger than the limit of 600 MiB (set with --max-size)" in done.stderr
    assert not image_dir(name).exists()  # nor anything in it
