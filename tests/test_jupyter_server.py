"""The Jupyter front end of the environment (`make lab`): JupyterLab serves, lists the notebooks, and runs
step 1 in a kernel that is this environment's Python, as a user does who edits the parameters cell."""

import ast
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import REPO_ROOT, tiny_params

STEP_NOTEBOOKS = {"01_preprocess.ipynb", "02_factorize.ipynb", "03_stats.ipynb", "04_enrichment.ipynb"}
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Server:
    """A headless JupyterLab on a free port with a random token; its log goes to a file, shown on failure."""

    def __init__(self, tmp_path: Path):
        self.port, self.token = free_port(), uuid.uuid4().hex
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "jupyter-server.log"
        home = tmp_path / "jupyter"
        data_dir = home / "data"
        # A user-level `python3` kernelspec that must not shadow the environment's (the kernel would not start).
        decoy = data_dir / "kernels" / "python3"
        decoy.mkdir(parents=True)
        (decoy / "kernel.json").write_text(json.dumps({
            "argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "not this environment's Python", "language": "python"}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PERTURBNMF_"))}
        env.update(
            JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_DATA_DIR=str(data_dir), IPYTHONDIR=str(home / "ipython"), JUPYTER_PLATFORM_DIRS="1",
            # as `make lab`: the environment's kernelspecs first, whatever JUPYTER_PREFER_ENV_PATH says
            JUPYTER_PATH=str(Path(sys.prefix) / "share" / "jupyter"), JUPYTER_PREFER_ENV_PATH="0",
        )
        command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={REPO_ROOT}"]
        if os.geteuid() == 0:
            command.append("--allow-root")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def fail(self, message: str):
        self.log.flush()
        pytest.fail(f"{message}\n--- Jupyter server log ({self.log_path}) ---\n{self.log_path.read_text()}")

    def request(self, method: str, path: str, body=None, expect: int = 200):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode(errors="replace")
        if status != expect:
            self.fail(f"{method} {path}: HTTP {status}, expected {expect}: {text[:2000]}")
        return json.loads(text) if text and text.lstrip().startswith(("{", "[")) else text

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.fail(f"the server exited with code {self.process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(urllib.request.Request(
                        f"{self.base}/api/status", headers={"Authorization": f"token {self.token}"}), timeout=5):
                    return
            except OSError:
                time.sleep(0.3)
        self.fail(f"the server did not answer /api/status within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: the server shuts its kernels down and exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
    assert server.process.returncode is not None, "the Jupyter server is still running"


def parameter_names(source: str) -> set[str]:
    targets = [target for node in ast.parse(source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for target in getattr(node, "targets", [getattr(node, "target", None)])]
    return {target.id for target in targets if isinstance(target, ast.Name)}


def small_parameters_cell(source: str, tmp_path: Path) -> str:
    """The parameters cell's defaults followed by the tiny run's values (those step 1 declares), into tmp_path."""
    names = parameter_names(source)
    overrides = {k: v for k, v in tiny_params(tmp_path).items() if k in names}
    assert {"output_dir", "simulate", "input"} <= set(overrides), "the parameters cell changed: update this test"
    lines = [f"{name} = {value!r}" for name, value in overrides.items()]
    return source + "\n# the test's small run, written under tmp_path\n" + "\n".join(lines) + "\n"


class KernelChannel:
    """Executes code through a kernel's websocket (/api/kernels/<id>/channels, Jupyter messaging protocol)."""

    def __init__(self, server: Server, kernel_id: str):
        self.server, self.kernel_id, self.session = server, kernel_id, uuid.uuid4().hex

    async def __aenter__(self):
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        url = f"ws://127.0.0.1:{self.server.port}/api/kernels/{self.kernel_id}/channels?session_id={self.session}"
        request = HTTPRequest(url, headers={"Authorization": f"token {self.server.token}"})
        self.ws = await asyncio.wait_for(websocket_connect(request), 30)
        return self

    async def __aexit__(self, *exc):
        self.ws.close()

    def _send(self, channel: str, msg_type: str, content: dict) -> str:
        msg_id = uuid.uuid4().hex
        self.ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": msg_type, "session": self.session, "username": "test",
                       "version": "5.3", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "parent_header": {}, "metadata": {}, "content": content, "channel": channel, "buffers": []}))
        return msg_id

    async def _replies(self, msg_id: str, reply_type: str, deadline: float):
        """The reply to ``msg_id`` and its iopub messages, once the kernel is idle again."""
        reply, iopub, idle = None, [], False
        while reply is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {reply_type} within the time limit")
            raw = await asyncio.wait_for(self.ws.read_message(), left)
            if raw is None:
                raise ConnectionError("the kernel's websocket closed")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["channel"] == "shell" and msg["msg_type"] == reply_type:
                reply = msg
            elif msg["channel"] == "iopub":
                iopub.append(msg)
                idle = idle or (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle")
        return reply, iopub

    async def kernel_info(self, deadline: float) -> dict:
        return (await self._replies(self._send("shell", "kernel_info_request", {}), "kernel_info_reply",
                                    deadline))[0]

    async def execute(self, code: str, deadline: float):
        msg_id = self._send("shell", "execute_request", {
            "code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        reply, iopub = await self._replies(msg_id, "execute_reply", deadline)
        stdout = "".join(m["content"]["text"] for m in iopub
                         if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        return reply["content"], stdout


def test_jupyterlab_serves_the_notebooks_and_runs_step_1_in_this_environment(server, tmp_path):
    assert "<title>JupyterLab</title>" in server.request("GET", "/lab")  # the front end is installed

    listing = server.request("GET", "/api/contents/notebooks")
    assert STEP_NOTEBOOKS <= {item["name"] for item in listing["content"]}

    notebook = server.request("GET", "/api/contents/notebooks/01_preprocess.ipynb")["content"]
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    tagged = [i for i, cell in enumerate(cells) if "parameters" in cell["metadata"].get("tags", [])]
    assert len(tagged) == 1
    sources = [cell["source"] for cell in cells]
    sources[tagged[0]] = small_parameters_cell(sources[tagged[0]], tmp_path)

    kernel = server.request("POST", "/api/kernels", {"name": "python3", "path": "notebooks/01_preprocess.ipynb"},
                            expect=201)

    async def run():
        deadline = time.monotonic() + RUN_TIMEOUT_S
        async with KernelChannel(server, kernel["id"]) as channel:
            await channel.kernel_info(deadline)
            content, stdout = await channel.execute("import os, sys; print(sys.executable); print(os.getpid())",
                                                    deadline)
            assert content["status"] == "ok", content
            executable, pid = stdout.split()
            for number, source in enumerate(sources, 1):
                content, _ = await channel.execute(source, deadline)
                if content["status"] != "ok":
                    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(content.get("traceback", [])))
                    server.fail(f"code cell {number} of 01_preprocess.ipynb: {content['status']} "
                                f"{content.get('ename')}: {content.get('evalue')}\n{traceback}\n--- cell ---\n{source}")
        return executable, int(pid)

    try:
        executable, kernel_pid = asyncio.run(run())
    except (TimeoutError, ConnectionError) as err:
        server.fail(f"running 01_preprocess.ipynb in the kernel: {err!r}")

    assert Path(executable).resolve() == Path(sys.executable).resolve(), "the kernel is not this environment's Python"
    output_dir = Path(tiny_params(tmp_path)["output_dir"])
    assert (output_dir / "data" / "preprocessed.h5ad").is_file()  # RunPaths.at(output_dir).preprocessed

    server.request("DELETE", f"/api/kernels/{kernel['id']}", expect=204)
    assert server.request("GET", "/api/kernels") == []
    deadline = time.monotonic() + 10
    while alive(kernel_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(kernel_pid), "the kernel process outlived its shutdown"

    server.stop()
    assert server.process.returncode is not None
    with pytest.raises(ProcessLookupError):  # nothing is left of the server's process group (the kernel had its own)
        os.killpg(server.process.pid, 0)
