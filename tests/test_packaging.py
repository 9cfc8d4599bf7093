"""What pyproject.toml promises holds: the Python versions it claims can run Ferry."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _min_python() -> tuple[int, int]:
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", _project()["requires-python"].strip())
    assert m, "requires-python should be a plain lower bound"
    return int(m[1]), int(m[2])


def test_every_module_imports_without_the_stdlib_modules_newer_than_the_minimum():
    """Python 3.10 has no tomllib: each module must import with it absent (tomli instead) if 3.10 is claimed."""
    newer = {(3, 11): ["tomllib"], (3, 12): [], (3, 13): []}
    hidden = [m for v, mods in newer.items() if v > _min_python() for m in mods]
    modules = sorted("ferry_migrate." + ".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for pkg in ("engine", "channels") for p in (ROOT / pkg).rglob("*.py")
                     if p.name != "__main__.py")
    code = ("import sys\n"
            f"for m in {hidden!r}: sys.modules[m] = None  # as on the oldest Python claimed\n"
            f"for m in {modules!r}:\n"
            "    __import__(m.removesuffix('.__init__'))\n"
            "from ferry_migrate.engine.experiment.spec import parse_spec\n"
            "parse_spec('[sweep]\\npage-size = [\"4K\"]\\n', path='sweep')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_backports_are_dependencies_where_needed():
    deps = _project()["dependencies"]
    if _min_python() < (3, 11):
        assert any(d.replace(" ", "").startswith("tomli>=") and "python_version<'3.11'" in d.replace(" ", "")
                   for d in deps), deps


def test_a_wheel_installs_one_import_name(tmp_path):
    """Installed, Ferry is ferry_migrate.engine and ferry_migrate.channels: no generic top-level names."""
    import zipfile
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ferry_migrate"}, top
    for module in ("ferry_migrate/engine/cli.py", "ferry_migrate/channels/codec.py",
                   "ferry_migrate/engine/control/driver.py", "ferry_migrate/engine/experiment/spec.py"):
        assert module in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ferry = ferry_migrate.engine.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
