"""The GPU install (``scripts/install_gpu.sh``, the README's command) resolves, and Transformer Engine's PyTorch
extension would be built against the torch it runs with.

Checked with ``--dry-run --ignore-installed`` (needs the package index; minutes: pip prepares Transformer Engine's
source distribution, which installs CUDA torch into a temporary build environment). The build-isolation trap is
made to bite whatever the index holds: a dummy ``torch 2.99.0`` wheel is offered beside it, which an unpinned
build environment (``torch>=2.1`` in transformer_engine_torch's pyproject.toml) picks.
"""

import os
import re
import subprocess
import zipfile

import pytest

from ..helpers import ROOT

pytestmark = pytest.mark.slow

NETWORK_ERRORS = ("Temporary failure in name resolution", "Network is unreachable", "ConnectionError", "timed out")


def _newer_dummy_torch(directory) -> None:
    """A pure-Python wheel named torch 2.99.0: newer than any real torch, useless to build against."""
    info = "torch-2.99.0.dist-info"
    files = {
        "torch/__init__.py": "",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: torch\nVersion: 2.99.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: megatron-dapo-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(directory / "torch-2.99.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def _build_environment_torch(pip_log: str) -> list[str]:
    """The torch versions pip installed into build environments (``Successfully installed ... torch-X``)."""
    return re.findall(r"Successfully installed .*?\btorch-(\S+)", pip_log)


def test_gpu_install_pins_torch_in_transformer_engines_build_environment(tmp_path):
    _newer_dummy_torch(tmp_path)
    # An empty constraint file replaces the CPU-only constraint and any torch cap of the machine's pip configuration
    # (these machines cap torch at the releases on their disk; an empty PIP_CONSTRAINT does not lift it), as on a GPU
    # host; the script sets its own.
    env = {**os.environ, "PIP_CONSTRAINT": os.devnull}
    command = ["bash", "scripts/install_gpu.sh", "--dry-run", "--ignore-installed", "--disable-pip-version-check",
               "-v", "--find-links", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    if result.returncode and any(error in result.stderr for error in NETWORK_ERRORS):
        pytest.skip(f"the package index is unreachable: {result.stderr.strip().splitlines()[-1]}")
    log = result.stdout + result.stderr
    assert "transformer_engine_torch-2.11.0.tar.gz" in log, "TE's PyTorch extension is no longer a source build"
    assert _build_environment_torch(log) == ["2.14.1"], _build_environment_torch(log)
    assert result.returncode == 0, result.stderr[-3000:]
    would_install = next(line for line in result.stdout.splitlines() if line.startswith("Would install"))
    for package in ("sglang-0.5.23", "torch-2.14.1", "transformer_engine-2.11.0", "transformer_engine_torch-2.11.0",
                    "transformers-5.19.0", "tokenizers-0.23.2", "megatron-core-0.16.1", "nemo_run-0.11.1"):
        assert f" {package} " in f" {would_install} ", package


def test_gpu_install_refuses_a_host_without_a_cuda_13_toolkit(tmp_path):
    """On this CPU host (no nvcc) the script stops before pip with one line naming the fix."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", "scripts/install_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "install_gpu.sh: nvcc not found: install a CUDA 13 toolkit and set CUDA_HOME (Transformer Engine compiles "
        "against it)"
    )
