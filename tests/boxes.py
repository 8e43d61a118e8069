"""Test helper: what a fresh machine looks like from here. A copy of the working tree as the device tool copies
it, and a Python that has this interpreter's packages (torch, pip, setuptools, ...) but not this checkout's
fastcifar install; and the bench/ scripts (not a package) imported by path."""

import importlib.util
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_copy(dest: Path) -> None:
    """Tracked files plus untracked ones git does not ignore, as the device tool copies a working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def bench_script(name: str):
    """bench/<name>.py imported as the module `name` (registered in sys.modules, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def box_python(venv: Path) -> Path:
    """A venv that sees this interpreter's packages through a .pth line (torch, pip, setuptools, ...) but not
    their .pth hooks, so this checkout's editable install stays invisible, as on the box."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "box-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv / "bin" / "python"
