"""The Ray-free core (model, data, index, eval, config) must import without Ray or vLLM.

Imports run in a fresh interpreter, so modules that other tests already imported cannot hide a
leak. The checker names the first module after whose import a forbidden package appeared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECKER = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    walked, plain, forbidden = (arg.split(",") if arg else [] for arg in sys.argv[1:4])

    def loaded():
        return {name.split(".")[0] for name in sys.modules} & set(forbidden)

    def check(name):
        before = loaded()
        importlib.import_module(name)
        if loaded() - before:
            print(f"importing {name} loaded {sorted(loaded() - before)}")
            sys.exit(1)

    count = 0
    for name in plain + walked:
        check(name)
        count += 1
    for pkg_name in walked:
        pkg = sys.modules[pkg_name]
        # Consumed lazily: walk_packages imports each sub-package right after yielding it, so
        # importing it here first keeps the blame on the right module.
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            check(info.name)
            count += 1
    if loaded():  # safety net for imports the per-module check could not attribute
        print(f"loaded {sorted(loaded())}")
        sys.exit(1)
    print(f"ok: {count} modules")
    """
)


def run_checker(
    walked: list[str], plain: list[str], forbidden: list[str], path: Path
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path)}
    args = [",".join(walked), ",".join(plain), ",".join(forbidden)]
    return subprocess.run(
        [sys.executable, "-c", CHECKER, *args], cwd=path, env=env, capture_output=True, text=True, timeout=300
    )


def test_core_packages_do_not_import_ray_or_vllm() -> None:
    result = run_checker(
        walked=["imprag_ray.model", "imprag_ray.data", "imprag_ray.index"],
        plain=["imprag_ray.eval", "imprag_ray.config"],
        forbidden=["ray", "vllm"],
        path=ROOT,
    )
    assert result.returncode == 0, (
        "the Ray-free core imported Ray or vLLM; move that import to the Ray/vLLM edge "
        f"(train/, serve/, vllm_plugin/):\n{result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize(
    ("leak", "culprit"),
    [("leaky.py", "corepkg.model.leaky"), ("sub/__init__.py", "corepkg.model.sub")],
)
def test_checker_catches_a_forbidden_import(tmp_path: Path, leak: str, culprit: str) -> None:
    model = tmp_path / "corepkg" / "model"
    (model / "sub").mkdir(parents=True)
    for init in ("corepkg/__init__.py", "corepkg/model/__init__.py", "corepkg/model/sub/__init__.py"):
        (tmp_path / init).write_text("")
    (model / "clean.py").write_text("import json\n")
    (model / "sub" / "inner.py").write_text("import json\n")
    (model / leak).write_text("import wave\n")  # stdlib stand-in for `import ray`
    result = run_checker(["corepkg.model"], [], ["ray", "wave"], tmp_path)
    assert result.returncode == 1
    assert f"importing {culprit} loaded ['wave']" in result.stdout
