"""embedseg-train and embedseg-export on a runtime-only install: help and version work, commands that
need torch or onnx say which extra to install (one line, exit 2), never a ModuleNotFoundError traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from embedseg_exporters import __version__ as export_version
from embedseg_training import __version__ as train_version

from .conftest import REPO, UPSTREAM

# As on a `pip install ".[cpu]"` machine: importing these raises ModuleNotFoundError (name set, as when
# the package is absent).
BLOCK = "import sys\nfor name in filter(None, sys.argv[1].split(',')):\n    sys.modules[name] = None\n"
ENTRY = {"train": "embedseg_training.cli", "export": "embedseg_exporters.cli"}
DEMO_ONNX = REPO / "embedseg_deploy" / "models" / "demo2d.onnx"


def cli(tool: str, *args: str, blocked: str = "torch,onnx,onnxscript") -> subprocess.CompletedProcess:
    """Run ``embedseg-<tool> ARGS`` through its entry function in a child where ``blocked`` are absent."""
    code = BLOCK + textwrap.dedent(
        f"""
        from {ENTRY[tool]} import main
        main(sys.argv[2:], prog_name="embedseg-{tool}")
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code, blocked, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def says_install(proc: subprocess.CompletedProcess, command: str, module: str, extra: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"Error: {command} needs {module}, which cannot be imported here")
    assert f'pip install "embedseg-deploy[{extra}]"' in proc.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_lists_the_commands_without_torch(flag):
    proc = cli("train", flag)
    assert proc.returncode == 0, proc.stderr
    assert "import-upstream" in proc.stdout and "train " in proc.stdout and "--version" in proc.stdout
    sub = cli("train", "train", flag)
    assert sub.returncode == 0 and "--epochs" in sub.stdout, sub.stderr


def test_versions_without_torch():
    assert cli("train", "--version").stdout.strip() == f"embedseg-train, version {train_version}"
    assert cli("export", "--version").stdout.strip() == f"embedseg-export, version {export_version}"


def test_train_commands_without_torch_name_the_train_extra(tmp_path):
    says_install(cli("train", tmp_path, "--out", tmp_path / "run"), "embedseg-train train", "torch", "train")
    says_install(
        cli("train", "train", tmp_path, "--out", tmp_path / "run"), "embedseg-train train", "torch", "train"
    )
    ckpt = tmp_path / "best_iou_model.pth"
    ckpt.write_bytes(b"\x80")
    says_install(
        cli("train", "import-upstream", ckpt, "--out", tmp_path / "m.pth"),
        "embedseg-train import-upstream",
        "torch",
        "train",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_iou_model.pth"]


def test_export_help_works_and_commands_name_the_export_extra(tmp_path):
    proc = cli("export", "--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("onnx", "trt", "info")), proc.stderr
    onnx_help = cli("export", "onnx", "--help")
    help_text = " ".join(onnx_help.stdout.split())
    assert onnx_help.returncode == 0 and "fp16 on images like yours: 0.1,0.05,0.005" in help_text
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"PK\x03\x04 not really a zip")
    says_install(
        cli("export", "onnx", ckpt, "-o", tmp_path / "m.onnx"), "embedseg-export onnx", "torch", "export"
    )
    says_install(
        cli("export", "onnx", ckpt, "-o", tmp_path / "m.onnx", blocked="onnx"),
        "embedseg-export onnx",
        "onnx",
        "export",
    )
    says_install(cli("export", "info", ckpt), "embedseg-export info CHECKPOINT", "torch", "export")
    says_install(
        cli("export", "trt", DEMO_ONNX, "-o", tmp_path / "m.engine"), "embedseg-export trt", "onnx", "export"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def test_export_info_on_an_onnx_model_needs_neither_torch_nor_onnx():
    proc = cli("export", "info", DEMO_ONNX)
    assert proc.returncode == 0, proc.stderr
    assert "onnx" in proc.stdout and "onnx not installed: only the header was checked" in proc.stdout


def test_with_torch_installed_the_commands_still_run(tmp_path):
    """The check imports the real package when it is there: a bad checkpoint is a bad-input error."""
    upstream = UPSTREAM / "2d" / "checkpoint.pth"
    if not upstream.exists():
        pytest.skip("upstream fixtures absent")
    proc = cli("train", "import-upstream", upstream, "--out", tmp_path / "m.pth", "--grid", "96", blocked="")
    assert proc.returncode == 1 and "--grid gives 1 size(s), but this 2D model needs 2" in proc.stderr
