"""What a package index and a user's machine see of moerail: the sdist's file list holds what the
Rust build includes at compile time (``include_str!`` of ``csrc/cuda``), the metadata names the
license file that is there and the extras the optional features need, and the release workflow
builds and smoke-tests what the README says it does. (``make test-dist`` builds the wheel and the
sdist and installs both in fresh venvs: ``tools/check_dist.py``.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_sdist_carries_every_file_the_rust_build_includes():
    """Every ``include_str!`` / ``include_bytes!`` path outside the crates must be in the sdist's
    include list (maturin ships the crates themselves)."""
    includes = [i["path"] for i in _pyproject()["tool"]["maturin"].get("include", []) if i.get("format") in ("sdist", None)]
    needed = set()
    for rs in (ROOT / "rust").rglob("*.rs"):
        for m in re.finditer(r'include_(?:str|bytes)!\(concat!\(env!\("CARGO_MANIFEST_DIR"\),\s*"([^"]+)"', rs.read_text()):
            crate = next(p for p in rs.parents if (p / "Cargo.toml").is_file())
            target = (crate / m.group(1).lstrip("/")).resolve()
            if ROOT / "rust" not in target.parents:
                needed.add(target.relative_to(ROOT).as_posix())
    assert "csrc/cuda" in needed
    for d in needed:
        files = [f.relative_to(ROOT).as_posix() for f in (ROOT / d).iterdir()]
        assert files
        for f in files:
            assert any(Path(f).match(p) for p in includes), (f, includes)


def test_metadata_license_and_extras():
    proj = _pyproject()["project"]
    assert proj["license"] == "Apache-2.0" and proj["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    extras = proj["optional-dependencies"]
    assert extras["plot"] == ["matplotlib"] and extras["progress"] == ["tqdm"]
    assert (ROOT / "CHANGELOG.md").read_text().startswith("# Changelog")


def test_release_workflow_builds_both_arches_and_the_sdist_and_smoke_tests_them():
    yaml = pytest.importorskip("yaml")
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    jobs = wf["jobs"]
    assert {e["target"] for e in jobs["wheels"]["strategy"]["matrix"]["include"]} == {"x86_64", "aarch64"}
    for job in ("wheels", "sdist"):
        steps = jobs[job]["steps"]
        assert any("maturin-action" in s.get("uses", "") for s in steps)
        assert any("smoke.py" in s.get("run", "") for s in steps), job
    build = next(s for s in jobs["wheels"]["steps"] if "maturin-action" in s.get("uses", ""))
    assert build["with"]["manylinux"] in ("2014", "2_17", "2_28")
    assert (ROOT / "tools" / "smoke.py").is_file()
