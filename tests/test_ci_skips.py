"""tests/conftest.py in CI: a skip of anything the machine can provide is a failure.

Runs pytest in a subprocess on a small test directory whose conftest takes the hooks
of tests/conftest.py: with CI set, skips (pytest.skip, skipif, a module skipped at
collection) fail, except reasons in CI_ALLOWED_SKIPS, which are listed at the end;
without CI they stay skips.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFTEST = "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport, " \
           "pytest_terminal_summary  # noqa: F401\n"
TESTS = '''
import pytest

def test_missing_tool():
    pytest.skip("'ip' not found in PATH: install iproute2")

def test_one_gib_page():
    pytest.skip("needs a free 1 GiB huge page; the kernel reserved only 0")

@pytest.mark.skipif(True, reason="QEMU not installed")
def test_skipif():
    pass

def test_runs():
    pass
'''
SKIPPED_MODULE = 'import pytest\npytest.importorskip("no_such_module_for_ferry_tests")\n'


def _pytest(tmp_path, ci: str | None, module: str = TESTS):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_some.py").write_text(module)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-c", os.devnull,
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_in_ci_skips_fail_unless_allowed(tmp_path):
    r = _pytest(tmp_path, "true")
    out = r.stdout
    assert r.returncode == 1, out
    assert "FAILED test_some.py::test_missing_tool" in out
    assert "ERROR test_some.py::test_skipif" in out  # a skipif skips in setup: reported as an error
    assert "SKIPPED" in out and "1 GiB huge page" in out
    assert "PASSED test_some.py::test_runs" in out
    assert out.count("skipped in CI:") >= 2
    # The skips CI keeps are listed at the end.
    tail = out.split("skips CI keeps (CI_ALLOWED_SKIPS)", 1)[1]
    assert "test_some.py::test_one_gib_page" in tail


def test_in_ci_a_module_skipped_at_collection_is_an_error(tmp_path):
    r = _pytest(tmp_path, "1", SKIPPED_MODULE)
    assert r.returncode == 2, r.stdout  # a collection error stops the run
    assert "ERROR test_some.py" in r.stdout and "skipped in CI: Skipped: could not import" in r.stdout


def test_outside_ci_skips_stay_skips(tmp_path):
    for ci in (None, "false"):
        r = _pytest(tmp_path, ci)
        assert r.returncode == 0, r.stdout
        assert "skipped in CI" not in r.stdout and "skips CI keeps" not in r.stdout
        assert "1 passed, 3 skipped" in r.stdout, r.stdout
