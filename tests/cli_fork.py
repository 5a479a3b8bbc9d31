"""Run the ``fusion_bench`` console script without paying its imports on every call.

Importing FusionBench's CLI (torch, Lightning, torchmetrics, transformers) takes ~11 s on 2 cores, and
the suite calls the CLI dozens of times. ``CliForkServer`` starts one Python process that imports the
CLI once (as the console script would, same ``sys.path[0]``) and then forks a child per call: the child
takes the call's working directory, environment, argv and output files, runs the console script's own
``_hydra_main`` and exits with its status after the ``atexit`` handlers, as the script does.

Only what a fresh process reads at start-up differs, so a call whose environment differs from the
server's in anything but ``RUNTIME_ENV`` (``OMP_NUM_THREADS`` is applied with ``torch.set_num_threads``)
gets a real subprocess instead. ``FUSION_BENCH_PAVE_TEST_CLI=subprocess`` turns the server off.

Protocol, one JSON line each way: request {args, cwd, env, out, err} -> {"pid"} once forked, then {"rc"}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

# variables the child can still apply itself: the thread count (torch.set_num_threads) and pytest's
# name of the running test, which nothing reads at import
RUNTIME_ENV = {"OMP_NUM_THREADS", "PYTEST_CURRENT_TEST"}


def _run_child(request: dict, script: str) -> NoReturn:
    """In the forked child: become the console script run with the request's cwd, env, argv and files."""
    import atexit

    code = 1
    try:
        os.setpgid(0, 0)  # the caller kills the whole group on a timeout (DDP workers included)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            os.dup2(os.open(path, flags), fd)
        if "OMP_NUM_THREADS" in request["env"]:
            import torch

            torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
        from fusion_bench.scripts.cli import _hydra_main

        sys.argv = [script, *request["args"]]
        try:
            _hydra_main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - a child must never return into the server's loop
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(script: str) -> None:
    """The server's loop: import the CLI, then fork one child per request line on stdin."""
    sys.path[0] = str(Path(script).parent)  # what the console script has there
    import fusion_bench.scripts.cli  # noqa: F401 - the imports every child inherits
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports Hydra's plugins (ours among them), as each run would

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request, script)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


class CliForkServer:
    """Client side: ``run(args, cwd, timeout)`` -> ``subprocess.CompletedProcess`` like ``subprocess.run``."""

    def __init__(self, script: Path, scratch: Path) -> None:
        self.script, self.scratch = script, scratch
        self.env = os.environ.copy()
        self.proc: subprocess.Popen | None = None
        self.calls = 0

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=self.env)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}, "the CLI fork server did not start"

    def forks(self, env: dict) -> bool:
        """Whether a call with ``env`` can run in a forked child (else: a fresh subprocess)."""
        if os.environ.get("FUSION_BENCH_PAVE_TEST_CLI") == "subprocess" or not hasattr(os, "fork"):
            return False
        differ = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return differ <= RUNTIME_ENV

    def run(self, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        env = os.environ.copy()
        if not self.forks(env):
            return subprocess.run([str(self.script), *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout, env=env)
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.calls += 1
        out, err = self.scratch / f"cli{self.calls}.out", self.scratch / f"cli{self.calls}.err"
        request = {"args": list(args), "cwd": str(cwd), "env": env, "out": str(out), "err": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        timer = _Killer(pid, timeout)
        try:
            rc = json.loads(self.proc.stdout.readline())["rc"]
        finally:
            timer.cancel()
        output = [path.read_text() if path.exists() else "" for path in (out, err)]  # none if killed before opening
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        result = subprocess.CompletedProcess([str(self.script), *args], rc, *output)
        if timer.fired:
            raise subprocess.TimeoutExpired(result.args, timeout, result.stdout, result.stderr)
        return result

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


class _Killer:
    """Kill a child's process group after ``timeout`` seconds unless cancelled first."""

    def __init__(self, pid: int, timeout: float) -> None:
        import threading

        self.pid, self.fired = pid, False
        self.timer = threading.Timer(timeout, self._kill)
        self.timer.start()

    def _kill(self) -> None:
        self.fired = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self.timer.cancel()


if __name__ == "__main__":
    serve(sys.argv[1])
