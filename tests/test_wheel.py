"""The wheel works outside the repository: built, installed into a fresh virtual environment in a temporary folder,
then `hf-distill --help`, `hf-distill run` on data files given by path, and the edge runner on the exported folder.

The fresh environment takes its dependencies (torch, transformers, ...) from this interpreter's site-packages through
a .pth file, so nothing is downloaded; hf_distill itself comes only from the installed wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, save_text_model, write_sst2_slice


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "hf_distill", source / "hf_distill", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(work), str(source)],
        check=True,
        cwd=work,
    )
    wheel = next(work.glob("hf_distill-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Dependencies from this environment; hf_distill from the wheel (the venv's own site-packages comes first).
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    return venv, work


def _run(venv, args, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def test_wheel_runs_outside_the_repository(installed, tmp_path):
    venv, _ = installed
    where = _run(venv, [str(venv / "bin" / "python"), "-c", "import hf_distill; print(hf_distill.__file__)"], tmp_path)
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout, where.stdout + where.stderr

    helped = _run(venv, ["hf-distill", "--help"], tmp_path)
    assert helped.returncode == 0 and "run" in helped.stdout and "export" in helped.stdout

    save_text_model(tmp_path / "teacher", layers=2)
    write_sst2_slice(tmp_path, train=48, dev=24)
    config = {
        "output_dir": str(tmp_path / "out"),
        "data": {
            "train": str(tmp_path / "train.tsv"),
            "validation": str(tmp_path / "dev.tsv"),
            "max_length": 32,
            "label_names": ["negative", "positive"],  # SST-2's ids 0, 1 (unnamed ids are LABEL_<id>)
        },
        "teacher": {"model": str(tmp_path / "teacher"), "epochs": 0.25, "batch_size": 16},
        "student": {"num_layers": 1},
        "distill": {"max_steps": 2, "per_device_train_batch_size": 8, "use_cpu": True, "disable_tqdm": True},
        "export": {"variants": ["fp32"], "max_metric_drop": 100.0, "num_validation": 24},
        "bench": {"enabled": False},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    ran = _run(venv, ["hf-distill", "run", "job.yaml"], tmp_path)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["export"][0]["variant"] == "fp32"

    onnx_dir = str(tmp_path / "out" / "export" / "onnx")
    for runner in (["hf-distill-edge"], [str(venv / "bin" / "python"), "-m", "hf_distill.edge"]):
        edge = _run(venv, [*runner, onnx_dir, "a gripping , funny film"], tmp_path)
        assert edge.returncode == 0, edge.stderr[-2000:]
        row = json.loads(edge.stdout.splitlines()[0])
        assert row["label"] in ("negative", "positive") and abs(sum(row["probabilities"]) - 1) < 1e-5


def test_edge_module_runs_without_torch(installed, edge_python, tmp_path):
    """`python -m hf_distill.edge` on a device: the wheel installed without its dependencies beside onnxruntime,
    tokenizers and numpy only. Importing the package must not pull in torch."""
    _, work = installed
    wheel = next(work.glob("hf_distill-*.whl"))
    device = tmp_path / "device"
    subprocess.run(
        [edge_python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(device), str(wheel)],
        check=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [edge_python, "-c", "import sys, hf_distill.edge; print('torch' in sys.modules)"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(device)},
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stderr
    usage = subprocess.run(
        [edge_python, "-m", "hf_distill.edge", "--help"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(device)},
        capture_output=True,
        text=True,
    )
    assert usage.returncode == 0 and "MODEL_DIR" in usage.stdout
