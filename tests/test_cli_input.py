"""Input the command line checks up front, with one line naming the value and the fix."""
from __future__ import annotations

import os

import pytest

from ferry_migrate.engine.ram import hugepage_status

from .test_cli import ferry  # noqa: F401 - fixture


@pytest.mark.parametrize("args, words", [
    (["--backing", "hugetlb"], ["hugetlb", "2M or 1G", "--page-size"]),
    (["--size", "0"], ["size 0", "positive"]),
    (["--blocks", "0"], ["blocks 0", "1 or more"]),
    (["--migration-timeout", "0"], ["--migration-timeout", "greater than 0"]),
    (["--migration-timeout", "-5"], ["--migration-timeout", "greater than 0"]),
    (["--migration-timeout", "soon"], ["--migration-timeout", "soon"]),
])
def test_demo_checks_before_starting_anything(ferry, tmp_path, args, words):
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    r = _run_in(ferry, env_tmp, "demo", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "error:" in r.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert list(env_tmp.iterdir()) == []  # no demo directory left behind


def _run_in(ferry, tmpdir, *args):
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmpdir)
    try:
        return ferry(*args)
    finally:
        if old is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = old


def test_migrate_timeout_must_be_positive(ferry):
    r = ferry("migrate", "--source", "ipc:///nonexistent/s", "--destination", "ipc:///nonexistent/d",
              "--migration-timeout", "0")
    assert r.returncode == 2 and "greater than 0" in r.stderr


def test_hugetlb_demo_asks_for_what_both_workers_need(ferry):
    page, size = 2 << 20, 64 << 20
    free, _ = hugepage_status(page)
    if free >= 2 * size // page:
        pytest.skip("this host has the huge pages free")
    r = ferry("demo", "--backing", "hugetlb", "--page-size", "2M", "--size", "64M")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "64 huge pages of 2 MiB needed" in r.stderr, r.stderr  # 32 for each of the two workers
    assert "source and the destination" in r.stderr


def test_experiment_check_refuses_a_hugetlb_sweep_without_huge_pages(ferry, tmp_path):
    if hugepage_status(1 << 30)[0] >= 2:
        pytest.skip("this host has two free 1 GiB huge pages")
    f = tmp_path / "huge.toml"
    f.write_text('name = "huge"\n[fixed]\npage-size = "1G"\nguest-size = "1G"\nbacking = "hugetlb"\n')
    r = ferry("experiment", "run", str(f), "--check")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "2 huge pages of 1 GiB needed" in r.stderr and "nr_hugepages" in r.stderr


def test_port_in_use_by_the_implicit_event_stream_says_so(ferry, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        # The control port is free; the event stream's default (control + 1) is the one in use.
        r = ferry("worker", "--role", "source", "--control", f"tcp://127.0.0.1:{port - 1}", "--size", "4M",
                  timeout=60)
    finally:
        s.close()
    assert r.returncode == 2, r.stderr
    assert f"tcp://127.0.0.1:{port}" in r.stderr and "event stream" in r.stderr and "--events" in r.stderr
