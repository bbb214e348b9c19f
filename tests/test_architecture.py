"""The import rule of docs/architecture.md, read from the source with ``ast`` (nothing is imported).

Core (engine, models, store and the small modules they use) never imports the developer tools (eval, train,
bench), the command line, the framework adapters or any framework; the adapters depend on the engine, never
the other way round; optional dependencies are imported by the one module that needs each.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kalm_rag"
INTEGRATIONS = {
    "langchain-kalm": ROOT / "integrations/langchain-kalm/langchain_kalm",
    "llama-index-postprocessor-kalm-rerank": ROOT / "integrations/llama-index-postprocessor-kalm-rerank/llama_index",
    "kalm-haystack": ROOT / "integrations/kalm-haystack/src/haystack_integrations",
}
FRAMEWORKS = (
    "langchain",
    "langchain_core",
    "langchain_classic",
    "llama_index",
    "haystack",
    "haystack_integrations",
    "langchain_kalm",
)
# kalm_rag.adapters stays last: the integrations may import it (TOOLS[:-1] below)
TOOLS = ("kalm_rag.eval", "kalm_rag.train", "kalm_rag.bench", "kalm_rag.cli", "kalm_rag.serve", "kalm_rag.adapters")
#: the runtime core: what `Reranker` needs to score a query
CORE = [
    "engine.py",
    "models",
    "store",
    "pooling.py",
    "prompt.py",
    "scores.py",
    "threads.py",
    "padding.py",
    "validation.py",
    "errors.py",
    "_logs.py",
    "paths.py",
    "_version.py",
    "__init__.py",
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; kalm-rag imports absolutely"
            found.add(node.module or "")
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def files(*where: str) -> list[Path]:
    out: list[Path] = []
    for w in where:
        p = PACKAGE / w
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", files(*CORE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_never_imports_tools_adapters_or_frameworks(path: Path):
    bad = sorted(n for n in imports(path) if is_under(n, TOOLS + FRAMEWORKS))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_of_kalm_rag_imports_a_framework(path: Path):
    bad = sorted(n for n in imports(path) if is_under(n, FRAMEWORKS))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_developer_tools_use_the_random_checkpoints():
    users = {module_name(p) for p in PACKAGE.rglob("*.py") if any(is_under(n, ("kalm_rag.bench",)) for n in imports(p))}
    assert users <= {"kalm_rag.bench.suite", "kalm_rag.bench.gpu", "kalm_rag.cli"}, users  # cli: only in bench
    assert not (PACKAGE / "testing.py").exists()


def test_data_eval_and_train_layering():
    # data is shared by eval and train (and a future indexer) and depends on neither
    assert not {n for n in imports(PACKAGE / "data.py") if is_under(n, TOOLS + ("kalm_rag.engine",))}
    for tool, other in (("eval", "kalm_rag.bench"), ("train", "kalm_rag.bench")):
        for p in files(tool):
            bad = sorted(n for n in imports(p) if is_under(n, (other, "kalm_rag.cli", "kalm_rag.adapters")))
            assert not bad, f"{p.relative_to(ROOT)} imports {bad}"
    # the old home of the readers is gone: one data module
    assert not (PACKAGE / "eval" / "data.py").exists()


def test_the_service_depends_on_the_engine_never_the_other_way_round():
    # the engine side of kalm_rag (engine, models, store, validation, errors) and the web stack; no tool, no adapter
    for p in files("serve"):
        bad = sorted(n for n in imports(p) if is_under(n, TOOLS[:4] + ("kalm_rag.adapters", "kalm_rag.data")))
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}"
    users = {module_name(p) for p in PACKAGE.rglob("*.py") if any(is_under(n, ("kalm_rag.serve",)) for n in imports(p))}
    # cli: inside serve only; bench.gpu: the GPU check drives the batcher
    assert users <= {"kalm_rag.cli", "kalm_rag.bench.gpu"} | {module_name(p) for p in files("serve")}, users


def test_optional_dependencies_stay_in_the_module_that_needs_them():
    serve = {module_name(p) for p in files("serve")}  # the service's own modules, whichever it is split into
    owners = {
        "redis": {"kalm_rag.store.redis"},
        "pyarrow": {"kalm_rag.data", "kalm_rag.index.ray_engine"},  # Ray Data's blocks are Arrow tables
        "ray": {"kalm_rag.index.ray_engine"},
        "matplotlib": {"kalm_rag.bench.suite"},
        "bm25s": {"kalm_rag.data"},
        "pytrec_eval": {"kalm_rag.eval.run"},
        "fastapi": serve,
        "starlette": serve,
        "pydantic": serve,
        "prometheus_client": serve,
        "uvicorn": {"kalm_rag.cli"},  # inside the serve command
    }
    for dep, allowed in owners.items():
        users = {module_name(p) for p in PACKAGE.rglob("*.py") if any(is_under(n, (dep,)) for n in imports(p))}
        assert users <= allowed, f"{dep} imported by {sorted(users - allowed)}"


def test_the_indexer_depends_on_the_engine_never_the_other_way_round():
    for p in files("index"):
        bad = sorted(n for n in imports(p) if is_under(n, TOOLS + FRAMEWORKS))
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}"
    users = {module_name(p) for p in PACKAGE.rglob("*.py") if any(is_under(n, ("kalm_rag.index",)) for n in imports(p))}
    assert users <= {"kalm_rag.cli"} | {module_name(p) for p in files("index")}, users
    assert not {n for n in imports(PACKAGE / "index" / "__init__.py") if is_under(n, ("kalm_rag.index.ray_engine",))}


@pytest.mark.parametrize("dist", sorted(INTEGRATIONS))
def test_adapters_use_the_engine_and_their_framework_only(dist: str):
    own = {
        "langchain-kalm": ("langchain_core", "langchain_kalm", "pydantic"),
        "llama-index-postprocessor-kalm-rerank": ("llama_index",),
        "kalm-haystack": ("haystack", "haystack_integrations"),
    }[dist]
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for p in INTEGRATIONS[dist].rglob("*.py"):
        for n in imports(p):
            top = n.split(".")[0]
            assert top in stdlib or is_under(n, own) or (top == "kalm_rag" and not is_under(n, TOOLS[:-1])), (
                f"{p.relative_to(ROOT)} imports {n}"
            )


def test_import_kalm_rag_loads_no_optional_dependency():
    probe = (
        "import sys, kalm_rag, kalm_rag.store, kalm_rag.adapters, kalm_rag.data, kalm_rag.index; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'pyarrow', 'matplotlib', 'bm25s', "
        "'pytrec_eval', 'langchain_core', 'llama_index', 'haystack', 'ranx', 'fastapi', 'starlette', 'uvicorn', "
        "'prometheus_client', 'ray'}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    setup = readme.split("## Set-up")[1].split("\n## ")[0]
    demo, test = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)[:2]
    assert "-c constraints.txt" in demo and demo.endswith("kalm-rag demo")
    for folder in INTEGRATIONS:
        assert f"-e integrations/{folder}" in test
    assert test.endswith("python -m pytest") and test in ci
    assert ci.index("ruff check .") < ci.index("ruff format --check .") < ci.index("mypy") < ci.rindex(test)
    assert "rm -rf .venv" in ci and "KALM_RAG_REQUIRE_REDIS=1" in ci


@pytest.mark.parametrize("leaf", ["errors.py", "reports.py", "_version.py"])
def test_the_lowest_layer_knows_no_other_kalm_rag_module(leaf: str):
    # issue #23, item 18: errors.py once imported the engine's EncodeReport (for a type), tying the engine and
    # everything that raises a KalmError into one import circle; TYPE_CHECKING imports count too
    own = {"kalm_rag.reports", "kalm_rag.reports.EncodeReport"} if leaf == "errors.py" else set()
    bad = sorted(n for n in imports(PACKAGE / leaf) if is_under(n, ("kalm_rag",)) and n not in own)
    assert not bad, f"{leaf} imports {bad}"
