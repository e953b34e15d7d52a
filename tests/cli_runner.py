"""Run many command lines of ``train.py`` / ``python -m lit_rlhf.export``, each in its own process,
without paying Python's imports of torch, lightning, transformers and datasets (~10 s here) every time.

A server process imports them once, before any tensor work (so no thread pool exists yet),
then forks one child per command: the child gets the command's argv, working directory,
environment and its own stdout/stderr files, runs the same ``main`` that ``train.py`` runs, and
exits with its exit status — 2 for bad input, a Python traceback and 1 for an uncaught
exception, -9 when it kills itself. A DDP command's other ranks are launched by Lightning as
real ``python train.py ...`` processes.

    with CLIRunner() as cli:
        result = cli.run(["fit", "-c", "configs/sft/demo.yaml", "--trainer.max_steps=0"])
        result.code, result.stderr
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """The non-empty stderr lines that are not warnings from libraries."""
        return [line for line in self.stderr.splitlines() if line.strip() and not _is_library_noise(line)]


def _is_library_noise(line: str) -> bool:
    # Python warnings (file:line: XWarning: ...) and their source line, which libraries print
    # on import; they are not our error surface.
    return "Warning:" in line or line.startswith("  ") or line.startswith("[rank")


class CLIRunner:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix="cli_runner_")

    def __enter__(self) -> CLIRunner:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.tmp.cleanup()

    def run(self, args: list[str], *, module: str | None = None, env: dict | None = None,
            cwd: Path = ROOT, timeout: float = 300) -> Result:
        """Run ``train.py *args`` (or ``python -m module *args``) and return its exit and output."""
        assert self.proc is not None and self.proc.poll() is None, "runner is not running"
        out, err = (Path(self.tmp.name) / name for name in ("stdout", "stderr"))
        job = {"args": [str(a) for a in args], "module": module, "env": env or {}, "cwd": str(cwd),
               "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"command did not finish in {timeout} s: {args}")
        code = json.loads(self.proc.stdout.readline())["code"]
        return Result(code, out.read_text(), err.read_text())


def _child(job: dict) -> None:
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    code = 0
    try:
        if job["module"]:
            import runpy

            sys.argv = [job["module"], *job["args"]]
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [str(ROOT / "train.py"), *job["args"]]
            from lit_rlhf.cli import main

            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve() -> None:
    # This checkout's package first, as `python train.py` from ROOT would import it.
    sys.path.insert(0, str(ROOT))
    # Imports only: no tensor op may run before fork (it would start thread pools).
    # `datasets` (with pandas and pyarrow) alone takes ~2.5 s to import: most commands read data.
    import datasets  # noqa: F401
    import lightning  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lit_rlhf.cli  # noqa: F401
    import lit_rlhf.data  # noqa: F401
    import lit_rlhf.export  # noqa: F401
    import lit_rlhf.modules  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
