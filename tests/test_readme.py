"""README.md runs as written: its shell commands and Python examples, block by block.

Conventions (README.md points here; keep them few and simple):

- Fenced blocks tagged ```sh (or ```bash / ```shell) are shell commands, run with
  ``bash -e -o pipefail``; blocks tagged ```python are Python programs, run with the
  virtualenv's interpreter. Blocks with any other tag, or none (a layout, a config shown as
  text), are not run.
- Each ``## `` section is one test, its blocks run in order; a section without runnable
  blocks is not a test. A section can be run alone: ``pytest tests/test_readme.py -k Quick``.
- An HTML comment on the line before a block (blank lines between are allowed) says how to
  run it: ``<!-- readme-test: host=A -->``, ``host=B`` or ``host=A,B`` (A, then B).
  ``<!-- readme-test: skip REASON -->`` leaves a block out; keep that for blocks that
  genuinely cannot run here (a placeholder repository URL), and give the reason.
- A block without a host runs here, as the user running the tests, in the checkout
  (README's set-up commands are meant to run there); ``make TARGET...`` lines in such blocks
  are checked with ``make -n`` (the targets exist and resolve), not run: ``make test`` is this
  very suite, and the demo and benchmarks have their own runs.
- A block for host A or B runs as on one of two machines: in a network namespace of its own
  (the bed's pair, joined by a veth with 198.51.100.1/24 on A and 198.51.100.2/24 on B, the
  documentation addresses the README uses), with its own ``/etc/wireguard``,
  ``/var/run/wireguard`` and ``/var/run/pywg`` (bind mounts of per-host directories: two
  ``wg0`` interfaces do not meet), in its own home directory as the working directory. The
  virtualenv is activated in every block (README's set-up says to do so).
- Placeholders in angle brackets are filled in by the test: ``<A's public key>`` and
  ``<B's public key>`` are the public keys of that host's ``/etc/wireguard/private.key``,
  ``<A's new public key>`` that of A's keystore entry ``/etc/wireguard/keys/wg0`` (after
  a rotation), ``<key>`` and ``<peer key>`` a fresh public key. Any other placeholder in a
  block that runs fails the test (say what it means here first).

Sections are found by heading and blocks by tag, so edits elsewhere in README.md (another
section, a longer layout) need nothing here unless they add commands that cannot run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pywg.manage.key import Key
from pywg.testing.netns import Bed, run

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUNNABLE = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python"}
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(?P<text>.*?)\s*-->$")
PLACEHOLDER = re.compile(r"<[A-Za-z][^<>\n]*>")
HOST_ADDRESSES = {"A": "198.51.100.1/24", "B": "198.51.100.2/24"}
BLOCK_TIMEOUT = 120.0
# Per-host directories bind-mounted over these, in each block's own mount namespace.
HOST_DIRS = {"etc-wireguard": ("/etc/wireguard", 0o700), "run-wireguard": ("/var/run/wireguard", 0o755),
             "run-pywg": ("/var/run/pywg", 0o700)}


@dataclass
class Block:
    section: str
    line: int  # 1-based line of the opening fence
    kind: str  # "sh" or "python"
    code: str
    hosts: tuple[str, ...] = ()
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.section})"


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def runnable(self) -> list[Block]:
        return [b for b in self.blocks if b.skip is None]


def parse(text: str) -> list[Section]:
    sections: list[Section] = [Section("(top)")]
    lines = text.splitlines()
    directive: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            sections.append(Section(line[3:].strip()))
            directive = None
        elif (found := DIRECTIVE.match(line.strip())) is not None:
            directive = found["text"]
        elif line.startswith("```"):
            tag = line[3:].strip().split()[0].lower() if line[3:].strip() else ""
            start = i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if tag in RUNNABLE:
                sections[-1].blocks.append(_block(sections[-1].title, start + 1, RUNNABLE[tag], body, directive))
            directive = None
        elif line.strip():
            directive = None  # a directive applies to the block right after it only
        i += 1
    return [s for s in sections if s.blocks]


def _block(section: str, line: int, kind: str, body: list[str], directive: str | None) -> Block:
    block = Block(section, line, kind, "\n".join(body) + "\n")
    if directive is None:
        return block
    if directive.startswith("skip"):
        reason = directive[4:].strip()
        if not reason:
            raise ValueError(f"README.md:{line}: readme-test: skip needs a reason")
        block.skip = reason
        return block
    found = re.fullmatch(r"host=([AB](?:,[AB])*)", directive)
    if not found:
        raise ValueError(f"README.md:{line}: unknown readme-test directive {directive!r}")
    block.hosts = tuple(found[1].split(","))
    return block


SECTIONS = parse(README.read_text(encoding="utf-8"))


def test_readme_has_runnable_blocks_and_few_skips() -> None:
    blocks = [b for s in SECTIONS for b in s.blocks]
    assert sum(b.kind == "python" for b in blocks) >= 2 and sum(b.kind == "sh" for b in blocks) >= 5
    skipped = [b for b in blocks if b.skip]  # rare: a README whose commands are not run is not checked
    assert len(skipped) <= 3, [f"{b.where}: {b.skip}" for b in skipped]


# --- running blocks ---------------------------------------------------------------------


class Hosts:
    """Hosts A and B on a bed: a namespace, per-host directories, a home."""

    def __init__(self, bed: Bed, base: Path) -> None:
        self.bed = bed
        self.base = base
        self.ns = {"A": bed.ns_a, "B": bed.ns_b}
        for host, veth in (("A", bed.veth_a), ("B", bed.veth_b)):
            run("ip", "addr", "add", HOST_ADDRESSES[host], "dev", veth, ns=self.ns[host])
            for name, (_, mode) in HOST_DIRS.items():
                (base / host / name).mkdir(parents=True, mode=mode)
            (base / host / "home").mkdir(mode=0o700)
        for target, mode in HOST_DIRS.values():  # mount points (wireguard-tools and pywg make them too)
            os.makedirs(target, mode=mode, exist_ok=True)

    def etc(self, host: str) -> Path:
        return self.base / host / "etc-wireguard"

    def prelude(self, host: str) -> str:
        mounts = " && ".join(f"mount --bind {self.base / host / name} {target}"
                             for name, (target, _) in HOST_DIRS.items())
        return f"{mounts} && cd {self.base / host / 'home'}"


def activate() -> str:
    """The shell line that activates this interpreter's virtualenv (as README says to)."""
    script = Path(sys.executable).parent / "activate"
    if script.exists():
        return f". {script}"
    return f'export PATH="{Path(sys.executable).parent}:$PATH"'


def public_of(private_file: Path) -> str:
    return Key.parse(private_file.read_text()).public_key().to_base64()


def fill(block: Block, hosts: Hosts | None, fresh: Key) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[0]
        if name in ("<key>", "<peer key>"):
            return fresh.to_base64()
        found = re.fullmatch(r"<([AB])'s (new )?public key>", name)
        if found and hosts is not None:
            etc = hosts.etc(found[1])
            path = etc / "keys" / "wg0" if found[2] else etc / "private.key"
            assert path.exists(), f"{block.where}: {name}: {path.relative_to(hosts.base)} does not exist yet"
            return public_of(path)
        raise AssertionError(f"{block.where}: unknown placeholder {name} (tests/test_readme.py lists them)")

    return PLACEHOLDER.sub(value, block.code)


def execute(block: Block, code: str, host: str | None, hosts: Hosts | None, work: Path) -> None:
    script = work / f"block{block.line}{host or ''}.{'sh' if block.kind == 'sh' else 'py'}"
    if block.kind == "sh" and host is None:
        code = re.sub(r"^(\s*)make\b", r"\1make -n", code, flags=re.MULTILINE)
    script.write_text(code)
    run_it = f"bash -e -o pipefail {script}" if block.kind == "sh" else f"python {script}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYWG_") and k != "LOG_LEVEL"}
    if host is None:
        argv = ["bash", "-c", f"{activate()} && {run_it}"]
        cwd = ROOT
    else:
        assert hosts is not None
        argv = ["ip", "netns", "exec", hosts.ns[host], "bash", "-c",
                f"{hosts.prelude(host)} && {activate()} && {run_it}"]
        cwd = work
    done = subprocess.run(argv, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, cwd=cwd, env=env,
                          check=False)
    shown = f"{block.where}{' on host ' + host if host else ''}:\n{code}\n--- stdout\n{done.stdout[-3000:]}" \
            f"\n--- stderr\n{done.stderr[-3000:]}"
    print(shown)
    assert done.returncode == 0, f"exit status {done.returncode}: {shown}"
    assert "Traceback" not in done.stderr, shown


@pytest.fixture
def hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hosts | None]:
    section: Section = request.param
    if not _needs_hosts(section):
        yield None
        return
    bed: Bed = request.getfixturevalue("bed")  # conftest's: required under CI=true
    yield Hosts(bed, tmp_path / "hosts")


def _needs_hosts(section: Section) -> bool:
    return any(b.hosts for b in section.runnable)


@pytest.mark.parametrize("hosts", [pytest.param(s, id=s.title, marks=[pytest.mark.netns] if _needs_hosts(s) else [])
                                   for s in SECTIONS if s.runnable], indirect=True)
def test_readme_section_runs_as_written(hosts: Hosts | None, request: pytest.FixtureRequest,
                                        tmp_path: Path) -> None:
    section: Section = request.node.callspec.params["hosts"]
    if _needs_hosts(section) and shutil.which("wg-quick") is None:
        pytest.fail("wg-quick is missing (make debs installs wireguard-tools)")
    fresh = Key.generate_private().public_key()
    for block in section.runnable:
        for host in block.hosts or (None,):
            execute(block, fill(block, hosts, fresh), host, hosts, tmp_path)
