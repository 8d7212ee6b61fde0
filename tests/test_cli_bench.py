"""`hf-distill export` and `hf-distill bench` on a tiny student with the real MiniLM tokenizer and SST-2 rows."""

import json
import subprocess
import sys

import pytest
from conftest import save_text_model, write_sst2_slice

from hf_distill.cli import main

BENCH_FIELDS = {
    "engine",
    "variant",
    "batch",
    "seq_len",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "throughput_per_s",
    "peak_rss_mb",
    "size_mb",
    "metric",
    "metric_value",
}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    save_text_model(folder / "s", layers=1)
    write_sst2_slice(folder, train=0, dev=40)
    return folder


def test_cli_export_then_bench(student_dir, capsys):
    out = student_dir / "onnx"
    code = main(
        [
            "export",
            str(student_dir / "s"),
            str(out),
            "--data",
            str(student_dir / "dev.tsv"),
            "--variants",
            "fp32,int8_dynamic",
            "--max-metric-drop",
            "100",
        ]
    )
    assert code == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["num_validation_examples"] == 40 and len(report["variants"]) == 2
    assert "| int8_dynamic |" in capsys.readouterr().out
    code = main(
        [
            "bench",
            str(out),
            "--student",
            str(student_dir / "s"),
            "--batch-sizes",
            "1,2",
            "--seq-lens",
            "8",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--output-dir",
            str(student_dir / "bench"),
        ]
    )
    assert code == 0
    result = json.loads((student_dir / "bench" / "bench.json").read_text())
    assert {(r["variant"], r["batch"]) for r in result["rows"]} == {
        (v, b) for v in ("student_fp32", "fp32", "int8_dynamic") for b in (1, 2)
    }
    for row in result["rows"]:
        assert BENCH_FIELDS <= set(row)
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["peak_rss_mb"] > 10
    onnx_rss = max(r["peak_rss_mb"] for r in result["rows"] if r["engine"] != "pytorch")
    torch_rss = min(r["peak_rss_mb"] for r in result["rows"] if r["engine"] == "pytorch")
    assert onnx_rss < 0.5 * torch_rss, (onnx_rss, torch_rss)  # an onnxruntime process loads no torch
    assert result["machine"]["onnxruntime"] and "cpu_flags" in result["machine"]
    assert "| engine |" in (student_dir / "bench" / "bench.md").read_text()
    assert (student_dir / "bench" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # A second export into the same folder is refused, with the user's files intact.
    assert main(["export", str(student_dir / "s"), str(out), "--data", str(student_dir / "dev.tsv")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "model_int8.onnx").is_file()


def test_cli_errors_exit_nonzero_with_a_message(student_dir, capsys):
    assert (
        main(["export", str(student_dir / "nope"), str(student_dir / "o2"), "--data", str(student_dir / "dev.tsv")])
        == 2
    )
    assert "No saved model" in capsys.readouterr().err
    assert main(["export", str(student_dir / "s"), str(student_dir / "o2"), "--data", "missing.tsv"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                str(student_dir / "s"),
                str(student_dir / "o2"),
                "--data",
                str(student_dir / "dev.tsv"),
                "--text-column",
                "text",
            ]
        )
        == 2
    )
    assert "needs a text column 'text'" in capsys.readouterr().err
    assert main(["bench", str(student_dir)]) == 2
    assert "no export_report.json" in capsys.readouterr().err
    assert not (student_dir / "o2").exists()


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "hf_distill.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "export" in result.stdout and "bench" in result.stdout


def _one_line_error(capsys, command, expected):
    """The command exits 2 with one line on stderr naming the problem, and no traceback."""
    assert main(command) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # progress bars share stderr
    assert len(errors) == 1 and "Traceback" not in err and expected in errors[0], err
    return errors[0]


def test_bad_files_are_one_line_errors(student_dir, capsys, tmp_path):
    import shutil

    data = ["--data", str(student_dir / "dev.tsv")]
    out = str(tmp_path / "o")
    for name, content, expected in (
        ("model.safetensors", b"\x00garbage", "Cannot load the model"),
        ("config.json", b"{not json", "config.json"),
        ("tokenizer.json", b"{not json", "Cannot load the tokenizer"),
    ):
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(student_dir / "s", broken)
        (broken / name).write_bytes(content)
        _one_line_error(capsys, ["export", str(broken), out, *data], expected)
    (tmp_path / "bad.jsonl").write_text('{"sentence": "ok", "label": 1}\n{broken\n')
    (tmp_path / "notadataset").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for path, expected in (
        (tmp_path / "bad.jsonl", "bad.jsonl"),
        (tmp_path / "notadataset", "notadataset"),
        (tmp_path / "notes.txt", "Unsupported data file"),
    ):
        _one_line_error(capsys, ["export", str(student_dir / "s"), out, "--data", str(path)], expected)
    assert not (tmp_path / "o").exists()
    (tmp_path / "bad.yaml").write_text("output_dir: [unclosed\n")
    _one_line_error(capsys, ["run", str(tmp_path / "bad.yaml")], "is not valid YAML")
    (tmp_path / "ok.yaml").write_text(f"output_dir: {tmp_path / 'run'}\n")
    _one_line_error(capsys, ["run", str(tmp_path / "ok.yaml"), "--set", "seed=["], "A --set value is not valid YAML")


def test_bench_on_a_corrupt_onnx_file_is_one_error_line(student_dir, capsys, tmp_path):
    import shutil

    export = tmp_path / "onnx"
    assert (
        main(
            [
                "export",
                str(student_dir / "s"),
                str(export),
                "--variants",
                "fp32",
                "--max-metric-drop",
                "100",
                "--data",
                str(student_dir / "dev.tsv"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    (export / "model.onnx").write_bytes(b"not an onnx file")
    err = _one_line_error(
        capsys, ["bench", str(export), "--seq-lens", "8", "--runs", "1", "--warmup", "0"], "model.onnx"
    )
    assert "corrupt" in err
    shutil.rmtree(export)
