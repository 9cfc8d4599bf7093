"""Ferry, installed under one import name: ``ferry_migrate.engine`` and ``ferry_migrate.channels``.

The repository keeps ``engine/`` and ``channels/`` at its top level; a wheel places them
inside this package, and pyproject.toml maps them here for an editable install. Run from a
checkout (tests, ``python -m ferry_migrate.engine.cli``), this package finds them one level up.
"""
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "engine")):
    # A checkout: engine/ and channels/ are siblings of this folder, not inside it.
    __path__.append(_os.path.dirname(_here))  # noqa: F821 (a package's own __path__)
