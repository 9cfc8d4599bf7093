"""Every command docs/user-guide.md shows runs, and prints what the guide shows, in shape.

The guide's runnable examples are ```console blocks: ``$ COMMAND`` lines (``\\``
continues a line), each followed by the output it shows. They run in order,
in one temporary directory, through a shell with ``ferry`` on PATH, on 80
columns; a command ending in `` &`` runs in the background (workers) and its
first output lines are checked. Output shapes: numbers, ports, pids and
digests may differ, words may not (compared word by word, so wrapping may
differ); ``...`` as a word stands for any words, inside a word for any
characters. The guide's fixed ports (5555, 6555, ...) become free ports here.

Any other code block that starts a line with ``ferry `` fails the test: what
the guide shows a user to type has to run here.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import group_gone

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "user-guide.md"
DOC_PORTS = (5555, 6555, 7555, 8555)


def guide_examples(text: str) -> list[tuple[int, str, list[str]]]:
    """[(line number, command, expected output lines)] of the guide's console blocks."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```console":
            i += 1
            cmd = None
            while not lines[i].startswith("```"):
                ln = lines[i]
                if ln.startswith("$ "):
                    if cmd is not None:
                        out.append(cmd)
                    c, start = ln[2:], i + 1
                    while c.endswith("\\"):
                        i += 1
                        c = c[:-1] + lines[i].strip()
                    cmd = (start, c, [])
                elif cmd is not None:
                    cmd[2].append(ln)
                i += 1
            if cmd is not None:
                out.append(cmd)
        i += 1
    return out


def untested_commands(text: str) -> list[str]:
    """Lines starting with `ferry ` in code blocks that are not console blocks."""
    bad, fence = [], None
    for n, ln in enumerate(text.splitlines(), 1):
        if ln.startswith("```"):
            fence = None if fence is not None else ln[3:].strip()
            continue
        if fence is not None and fence != "console" and ln.lstrip().startswith("ferry "):
            bad.append(f"{n}: {ln}")
    return bad


STAR = object()


def _token_pattern(tok: str):
    if tok == "...":
        return STAR
    rx = []
    for part in re.split(r"(\.\.\.|[0-9a-f]{8,}|\d+(?:[.,:]\d+)*)", tok):
        if not part:
            continue
        if part == "...":
            rx.append(".*?")
        elif len(part) >= 8 and re.fullmatch(r"[0-9a-f]+", part):
            rx.append("[0-9a-f]+")  # digests
        elif part[0].isdigit():
            rx.append(r"-?\d+(?:[.,:]\d+)*")
        else:
            rx.append(re.escape(part))
    return re.compile("".join(rx))


def shape_matches(expected: list[str], got: str) -> bool:
    """Does ``got`` have the shape of the ``expected`` lines?

    Compared word by word, so the same text wrapped elsewhere (a number one digit
    longer) still matches; ``...`` as a word stands for any words, inside a word
    for any text within that word; numbers match any numbers.
    """
    pats = [_token_pattern(t) for t in " ".join(expected).split()]
    words = got.split()
    i = j = 0
    star, mark = -1, 0
    while j < len(words):  # glob matching, backtracking to the last star only
        if i < len(pats) and pats[i] is not STAR and pats[i].fullmatch(words[j]):
            i, j = i + 1, j + 1
        elif i < len(pats) and pats[i] is STAR:
            star, mark, i = i, j, i + 1
        elif star >= 0:
            i, mark = star + 1, mark + 1
            j = mark
        else:
            return False
    while i < len(pats) and pats[i] is STAR:
        i += 1
    return i == len(pats)


def free_port_pairs(n: int) -> list[int]:
    """n ports P with P and P+1 both free (a worker's events go on control + 1)."""
    out = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65000:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
        except OSError:
            continue
        out.append(p)
    return out


def test_shape_matching():
    want = ["total time   1.22 s  (from ipc:///tmp/ferry-.../x.ctl)", "...", "end 5"]
    assert shape_matches(want, "total time   9.5 s  (from ipc:///tmp/ferry-ab12/x.ctl)\nx\ny\nend 12\n")
    assert shape_matches(want, "total time\n 9.5 s (from ipc:///tmp/ferry-q/x.ctl) end 12")  # wrapped elsewhere
    assert not shape_matches(want, "total tim   9.5 s  (from ipc:///tmp/ferry-q/x.ctl)\nend 12\n")
    assert not shape_matches(want, "total time   9.5 s  (from ipc:///tmp/ferry-q/x.ctl)\nend 12\nmore\n")


def test_every_command_in_the_guide_is_a_tested_example():
    assert untested_commands(GUIDE.read_text()) == []
    assert len(guide_examples(GUIDE.read_text())) >= 10


@pytest.fixture
def guide_shell(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ferry = bin_dir / "ferry"
    ferry.write_text(f'#!/bin/sh\nexec {sys.executable} -m ferry_migrate.engine.cli "$@"\n')
    ferry.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", COLUMNS="80", TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    background: list[subprocess.Popen] = []
    yield work, env, background
    for p in background:
        if not group_gone(p.pid):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in background:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_user_guide_commands_run_as_shown(guide_shell):
    work, env, background = guide_shell
    ports = dict(zip(DOC_PORTS, free_port_pairs(len(DOC_PORTS))))

    def local(text: str) -> str:
        for doc, real in ports.items():
            text = text.replace(f":{doc}", f":{real}").replace(f":{doc + 1}", f":{real + 1}")
        return text

    examples = guide_examples(GUIDE.read_text())
    for line, cmd, expected in examples:
        where = f"docs/user-guide.md:{line}: $ {cmd}"
        run = local(cmd)
        if run.endswith(" &"):
            p = subprocess.Popen(["bash", "-c", run[:-2]], cwd=work, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
            background.append(p)
            got = p.stdout.readline()
            if expected:
                # A worker's human ready line is several lines: read as many as shown.
                for _ in expected[1:]:
                    got += p.stdout.readline()
        else:
            r = subprocess.run(["bash", "-c", run], cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=300, start_new_session=True)
            got = r.stdout
        assert "Traceback" not in got, f"{where}\n{got}"
        shown = [local(e) for e in expected]
        if not shape_matches(shown, got):
            k = next(k for k in range(1, len(shown) + 1) if not shape_matches(shown[:k] + ["..."], got))
            pytest.fail(f"{where}\n--- the guide shows:\n" + "\n".join(expected) + f"\n--- it printed:\n{got}"
                        f"\n--- first line that differs: {expected[k - 1]!r}")
