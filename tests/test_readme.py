"""Every command and Python snippet of the README works as written, on this CPU, with the built-in model.

Each ```bash block runs as one bash script (`set -euo pipefail`) in a fresh temporary folder whose `.venv` is this
test's virtual environment, with that environment's `bin` taken off PATH: a command that works only in an
activated environment fails here as it fails for a new user. A block fails on a non-zero exit, a traceback, or
output that contradicts the README: a comment `# prints: TEXT` (a line of its own, or after a command) says that
TEXT appears in what the block prints, and the test checks it. Background processes a block starts (a server) are
stopped when it ends.

What does not run, and why, is said in the README itself, by a comment `<!-- not run in tests: REASON -->` before
the block (a GPU, a hub download, a run of hours, the test suite itself); the test lists those blocks with their
reasons. The setup at the head of the README's two commands (`python3 -m venv .venv && .venv/bin/pip install ...
&&`) is what `.ci/run` performs before it runs this suite, so the test checks that the extras it names are
installed, and runs the rest of the line.

```python blocks run in order in one interpreter, in a temporary folder, as a reader pasting them would.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

# Minutes of subprocesses and servers: outside the fast subset (`pytest -m "not slow"`).
pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*not run in tests:\s*(.+?)\s*-->", re.DOTALL)
FENCE = re.compile(r"^```(\w*)\s*$")
SETUP = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install -q -e \"?\.(\[([\w,-]+)\])?\"? && ")
PRINTS = re.compile(r"#\s*prints: (.+?)\s*$")
BLOCK_TIMEOUT_S = 420


@dataclass
class Block:
    language: str
    line: int
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, each with the skip reason of a comment right before it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, language = i, match.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = "\n".join(lines[max(0, start - 3) : start])
        skip = SKIP.findall(before)
        blocks.append(Block(language, start + 1, "\n".join(lines[start + 1 : end]), skip[-1] if skip else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
BASH = [b for b in BLOCKS if b.language == "bash"]
PYTHON = [b for b in BLOCKS if b.language == "python"]


def test_the_readme_has_commands_and_says_why_any_are_not_run() -> None:
    assert len(BASH) >= 10 and len(PYTHON) >= 2
    skipped = [b for b in BASH + PYTHON if b.skip]
    # The list of what is not run, with the README's reasons, in the test log.
    for block in skipped:
        print(f"not run: {block.name}: {block.skip}")
    assert all(len(b.skip or "") > 10 for b in skipped)
    assert len(skipped) < len(BASH + PYTHON) / 2, "most of the README must run"


def extras_of(code: str) -> list[str]:
    """The extras the setup at the head of a block's lines installs (checked installed, then stripped)."""
    extras = []
    for line in code.splitlines():
        match = SETUP.match(line)
        if match is not None and match.group(2):
            extras.extend(match.group(2).split(","))
    return extras


def test_the_setup_extras_are_what_this_environment_has() -> None:
    requested = {extra for block in BASH for extra in extras_of(block.code)}
    provided = set(distribution("depthwave").metadata.get_all("Provides-Extra") or [])
    assert requested <= provided, requested - provided


def environment(folder: Path) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    # The commands run on the CPU here whatever the machine has; the README's GPU commands are marked.
    return {**env, "PATH": path, "HOME": str(folder), "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def make_folder(tmp_path: Path) -> Path:
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return tmp_path


def run_script(script: str, folder: Path, timeout: float) -> tuple[int, str]:
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=folder,
        env=environment(folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return 124, output
    finally:
        # Whatever the block left in the background (a server) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    return process.returncode, output


def check_output(block: Block, code: int, output: str) -> None:
    shown = f"{block.name} exited {code}; output:\n{output[-6000:]}"
    assert code == 0, shown
    assert "Traceback (most recent call last)" not in output, shown
    for line in block.code.splitlines():
        claim = PRINTS.search(line)
        if claim is not None:
            assert claim.group(1) in output, f"{block.name} claims it prints {claim.group(1)!r}; " + shown


@pytest.mark.parametrize("block", BASH, ids=[b.name for b in BASH])
def test_readme_command(block: Block, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(f"the README marks it: {block.skip}")
    for extra in extras_of(block.code):
        try:
            distribution("depthwave")
        except PackageNotFoundError:  # pragma: no cover - the suite runs on an installed package
            pytest.fail("depthwave is not installed")
        assert extra in (distribution("depthwave").metadata.get_all("Provides-Extra") or []), extra
    script = "\n".join(SETUP.sub("", line) for line in block.code.splitlines())
    code, output = run_script("set -euo pipefail\n" + script, make_folder(tmp_path), BLOCK_TIMEOUT_S)
    check_output(block, code, output)


def test_readme_python_snippets(tmp_path: Path) -> None:
    """The Python blocks in order, in one interpreter (a later snippet may use an earlier one's names)."""
    runnable = [b for b in PYTHON if not b.skip]
    program = "\n".join(f"# {b.name}\n{b.code}\n" for b in runnable)
    (tmp_path / "snippets.py").write_text(program)
    code, output = run_script(f"{sys.executable} snippets.py", make_folder(tmp_path), BLOCK_TIMEOUT_S)
    for block in runnable:
        check_output(block, code, output)


def test_the_block_parser() -> None:
    text = "x\n<!-- not run in tests: needs a GPU -->\n```bash\na\nb\n```\n\n```python\nc\n```\n"
    bash, python = readme_blocks(text)
    assert (bash.language, bash.code, bash.skip, bash.line) == ("bash", "a\nb", "needs a GPU", 3)
    assert (python.language, python.code, python.skip) == ("python", "c", None)
    assert SETUP.sub("", 'python3 -m venv .venv && .venv/bin/pip install -q -e ".[serve]" && x') == "x"
    assert extras_of('python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev,serve]" && y') == ["dev", "serve"]
