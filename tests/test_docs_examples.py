"""The code blocks of README.md, docs/quickstart.md and docs/item-life.md run, so the
examples cannot rot.

Every ```python block of those files is a test of its own, named FILE:LINE (the line
of its opening fence), so a failure names the block. A block that raises fails.

The blocks of one file run in order in one namespace (with __name__ "__main__", as a
script's), the way a reader pastes them into one session: a later block may use what
an earlier one made, such as the `server` of the quickstart. After a block of a file
fails, the later blocks of that file are skipped, naming the one that failed.

They run in the suite's shared Ray session (the `ray_session` fixture), so a block
must not call ray.init(): pype.Server.remote() uses the Ray that runs. Each pype
server a file's blocks start (through pype.Server.remote) must be shut down by the
time its last block ends. The one exception is the job's default server that
pype.Queue starts (named "queues-<job id>"): it lives as long as the process by
design, and the suite's ray.util.queue tests share it.

A block that needs a cluster or a shell is not run: ```bash blocks are checked with
`bash -n`, and a ```python block right after a line `<!-- not run: REASON -->` is
only compiled.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ("README.md", "docs/quickstart.md", "docs/item-life.md")
NOT_RUN = re.compile(r"^<!--\s*not run\b.*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    run: bool

    @property
    def name(self) -> str:
        return f"{self.file}:{self.line}"


def blocks_of(text: str, file: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order."""
    found, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        start, body = index, []
        index += 1
        while index < len(lines) and lines[index].rstrip() != "```":
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise ValueError(f"{file}:{start + 1}: a code block that never closes")
        before = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        found.append(Block(file, start + 1, opening.group(1), "\n".join(body) + "\n",
                           run=not NOT_RUN.match(before)))
        index += 1
    return found


def collected(language: str) -> list[Block]:
    return [block for file in FILES
            for block in blocks_of((ROOT / file).read_text(encoding="utf-8"), file)
            if block.language == language]


PYTHON = collected("python")
BASH = collected("bash")


def compiled(block: Block):
    """The block compiled with its lines numbered as in its file, for tracebacks."""
    return compile("\n" * block.line + block.code, str(ROOT / block.file), "exec")


def test_each_file_has_python_examples():
    for file in FILES:
        assert any(block.file == file and block.run for block in PYTHON), file


def test_a_block_that_raises_fails():
    """The runner is no rubber stamp: an example that raises fails its test."""
    text = "intro\n\n```python\nx = 1\n```\n\n<!-- not run: needs a cluster -->\n```python\ny = (\n```\n"
    first, second = blocks_of(text, "example.md")
    assert (first.line, first.run, second.line, second.run) == (3, True, 8, False)
    namespace: dict = {}
    exec(compiled(first), namespace)  # noqa: S102 (running examples is the point)
    assert namespace["x"] == 1
    with pytest.raises(SyntaxError):
        compiled(second)
    with pytest.raises(AssertionError) as failure:
        exec(compiled(Block("example.md", 3, "python", "assert 1 == 2\n", True)), {})  # noqa: S102
    assert failure.traceback[-1].lineno + 1 == 4  # the line in the markdown file


@pytest.mark.parametrize("block", BASH, ids=[block.name for block in BASH])
def test_bash_example_parses(block):
    result = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, f"{block.name}: {result.stderr}"


class _FileState:
    """What the blocks of one markdown file share: a namespace, the servers they started."""

    def __init__(self):
        self.namespace: dict = {"__name__": "__main__"}
        self.started: list = []  # pype.Server handles made by the blocks
        self.shut_down: set[int] = set()  # ids of those whose shutdown() was called
        self.failed: str | None = None

    def running(self) -> list:
        return [server for server in self.started if id(server) not in self.shut_down]


@pytest.fixture(scope="module")
def file_states(ray_session):
    states: dict[str, _FileState] = {}
    yield states
    import ray

    default = f"queues-{ray.get_runtime_context().get_job_id()}"  # pype.Queue's: other tests use it
    for state in states.values():  # a failed block may have left its server running
        for server in state.running():
            if server.name != default:
                server.shutdown()


@pytest.fixture
def recorded_servers(monkeypatch):
    """Patch pype.Server so that the test sees which servers a block starts and stops."""
    import pype

    book: dict = {}
    start, stop = pype.Server.remote, pype.Server.shutdown

    def remote(*args, **kwargs):
        server = start(*args, **kwargs)
        book["state"].started.append(server)
        return server

    def shutdown(self):
        book["state"].shut_down.add(id(self))
        return stop(self)

    monkeypatch.setattr(pype.Server, "remote", staticmethod(remote))
    monkeypatch.setattr(pype.Server, "shutdown", shutdown)
    return book


@pytest.mark.parametrize("block", PYTHON, ids=[block.name for block in PYTHON])
def test_python_example(block, file_states, recorded_servers):
    code = compiled(block)
    if not block.run:
        return  # compiled, which is all a block marked "not run" gets
    assert not re.search(r"\bray\.init\(", block.code), (
        f"{block.name} calls ray.init(): examples run in the suite's Ray session, and "
        "pype.Server.remote() starts Ray when needed")
    state = file_states.setdefault(block.file, _FileState())
    if state.failed:
        pytest.skip(f"an earlier block of {block.file} failed: {state.failed}")
    recorded_servers["state"] = state
    try:
        exec(code, state.namespace)  # noqa: S102 (the examples are this repository's own)
    except BaseException:
        state.failed = block.name
        raise
    if block is [b for b in PYTHON if b.file == block.file and b.run][-1]:
        import ray

        default = f"queues-{ray.get_runtime_context().get_job_id()}"  # pype.Queue's
        left = [server for server in state.running() if server.name != default]
        assert not left, f"the examples of {block.file} leave servers running: {left}"
