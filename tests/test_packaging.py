"""What users install: the wheel, in a fresh venv, run from a folder that is not the checkout.

The editable install the rest of the suite uses maps package names onto the source tree, so it
hides data that the wheel leaves out and names that collide once installed (a module and a data
package both called ``edgepack.targets`` once did). The fresh venv takes every dependency from the
test's own environment through a ``.pth`` line, so nothing is downloaded, and the checkout is never
on its path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import make_tiny_sentence_transformer, write_texts
from decoder_factory import make_tiny_decoder

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=2700)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A venv holding only the built wheel; the suite's site-packages serve its dependencies."""
    work = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            "dist",
            str(ROOT),
        ],
        work,
        env,
    )
    (wheel,) = (work / "dist").glob("edgepack-*.whl")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], work, env)
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            work,
            env,
        ).stdout.strip()
    )
    # Dependencies come from this environment; a .pth line appends them after the venv's own
    # site-packages, and the editable finder of this checkout (a .pth of its own) is not run.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], work, env)
    return venv, {**env, "HF_HUB_OFFLINE": "1", "EDGEPACK_CACHE": str(work / "cache")}


def test_the_installed_package_is_the_wheel(installed: tuple[Path, dict[str, str]]) -> None:
    venv, env = installed
    elsewhere = venv.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    done = _run(
        [str(venv / "bin" / "python"), "-c", "import edgepack; print(edgepack.__file__)"],
        elsewhere,
        env,
    )
    assert str(venv) in done.stdout and str(ROOT) not in done.stdout


@pytest.mark.slow
def test_wheel_lists_targets_builds_and_verifies_from_another_folder(
    installed: tuple[Path, dict[str, str]],
) -> None:
    venv, env = installed
    edgepack = str(venv / "bin" / "edgepack")
    work = venv.parent / "user"
    work.mkdir()
    listed = _run([edgepack, "targets"], work, env).stdout
    assert "arm64" in listed and "cpu" in listed
    model = make_tiny_sentence_transformer(work / "model")
    texts = write_texts(work / "texts.txt", 80)
    built = _run(
        [
            edgepack,
            "build",
            "--model",
            str(model),
            "--calibration",
            str(texts),
            "--samples",
            "40",
            "--target",
            "cpu",
            "--out",
            "dist",
            "--max-drop",
            "-1",
            "--quiet",
        ],
        work,
        env,
    )
    tarball = work / built.stdout.strip().splitlines()[-1]  # printed relative to the user's folder
    assert tarball.is_file() and tarball.parent == work / "dist"
    verified = _run([edgepack, "verify", str(tarball)], work, env)
    assert verified.stdout.startswith("OK:")


def test_sample_names_resolve_inside_the_installed_package(
    installed: tuple[Path, dict[str, str]],
) -> None:
    """``--config sample:llm`` finds the config inside site-packages from any folder: the build
    gets as far as the model (missing on purpose, so nothing is built)."""
    venv, env = installed
    edgepack = str(venv / "bin" / "edgepack")
    work = venv.parent / "sample-user"
    work.mkdir(exist_ok=True)
    done = subprocess.run(
        [edgepack, "build", "--config", "sample:llm", "--model", "no-model-here"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "model path no-model-here does not exist" in done.stderr
    done = subprocess.run(
        [edgepack, "build", "--config", "sample:nope"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "sample:build, sample:llm" in done.stderr


@pytest.mark.slow
def test_the_decoder_sample_config_builds_from_another_folder(
    installed: tuple[Path, dict[str, str]],
) -> None:
    """The README's decoder line with a tiny decoder in place of SmolLM2: the sample's texts come
    from the installed package."""
    venv, env = installed
    edgepack = str(venv / "bin" / "edgepack")
    work = venv.parent / "llm-user"
    work.mkdir()
    model = make_tiny_decoder(work / "tiny")
    built = _run(
        [
            edgepack,
            "build",
            "--config",
            "sample:llm",
            "--model",
            str(model),
            "--precision",
            "int8",
            "--target",
            "arm64",
            "--out",
            "dist",
            "--quiet",
        ],
        work,
        env,
    )
    tarball = work / built.stdout.strip().splitlines()[-1]
    assert tarball.name == "tiny-arm64.tar.gz" and tarball.is_file()
    assert (work / "dist" / "report.html").is_file()
