"""The four distributions build, and each wheel holds its own package only, with its licence and honest
requirements (nothing of a framework or Redis in the core's)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build", reason="the build frontend is in the dev extra")

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("langchain", "llama-index", "llama_index", "haystack")
OPTIONAL = ("redis", "pyarrow", "matplotlib", "bm25s", "pytrec-eval", "ovos", "ray")


def build_wheel(src: Path, out: Path) -> Path:
    """Build ``src``'s wheel into ``out`` from a copy (so that no build/ or *.egg-info lands in the checkout)."""
    work = out / "src"
    shutil.copytree(
        src,
        work,
        ignore=shutil.ignore_patterns(
            "__pycache__", "*.egg-info", "build", "dist", "tests", ".venv", "integrations", "docs", "notebooks"
        ),
    )
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(work)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def metadata(wheel: Path) -> tuple[list[str], list[str]]:
    """``(file names, METADATA lines)`` of a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return names, zf.read(meta).decode().splitlines()


def requirements(meta: list[str]) -> list[str]:
    """Requirements that are always installed (no ``extra ==`` marker)."""
    return [
        line.split(":", 1)[1].strip() for line in meta if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]


@pytest.mark.timeout(600)
def test_the_core_wheel_holds_kalm_rag_only_with_its_weights_and_licence(tmp_path: Path):
    root_copy = tmp_path / "root"
    root_copy.mkdir()
    for name in ("kalm_rag", "pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root_copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, root_copy / name)
    wheel = build_wheel(root_copy, tmp_path / "dist")
    names, meta = metadata(wheel)
    tops = {n.split("/")[0] for n in names}
    assert tops == {"kalm_rag", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for needed in (
        "kalm_rag/py.typed",
        "kalm_rag/weights/kalm-mini/model.safetensors",
        "kalm_rag/weights/kalm-mini/config.json",
        "kalm_rag/weights/kalm-mini/README.md",
    ):
        assert needed in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert any(n.endswith(".dist-info/licenses/NOTICE") for n in names)
    assert "License-Expression: Apache-2.0" in meta and "Requires-Python: >=3.11" in meta
    always = requirements(meta)
    assert any(r.startswith("torch>=") for r in always) and not any("==" in r for r in always), always
    assert not [r for r in always if r.lower().startswith(FRAMEWORKS + OPTIONAL)], always
    assert any(line.startswith("Project-URL:") for line in meta)
    assert any(line == "Provides-Extra: redis" for line in meta)
    assert any(line == "Provides-Extra: ray" for line in meta)  # kalm-rag index --engine ray
    assert any(n == "kalm_rag/index/ray_engine.py" for n in names)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("folder", "package", "framework"),
    [
        ("langchain-kalm", "langchain_kalm/", "langchain-core"),
        ("llama-index-postprocessor-kalm-rerank", "llama_index/postprocessor/kalm_rerank/", "llama-index-core"),
        ("kalm-haystack", "haystack_integrations/components/rankers/kalm/", "haystack-ai"),
    ],
)
def test_each_integration_wheel_holds_its_package_and_needs_kalm_rag_and_its_framework(
    tmp_path: Path, folder: str, package: str, framework: str
):
    wheel = build_wheel(ROOT / "integrations" / folder, tmp_path / "dist")
    names, meta = metadata(wheel)
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith(package) for n in code), code
    assert package + "py.typed" in names and package + "__init__.py" in names
    # namespace packages shared with the framework: no __init__.py of ours above the package
    depth = package.rstrip("/").count("/")
    assert sum(n.endswith("/__init__.py") and n.count("/") <= depth for n in code) == 0
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    always = sorted(r.split(">")[0].split("<")[0].split("=")[0].strip() for r in requirements(meta))
    assert always == sorted(["kalm-rag", framework]), always
