"""GGUF teachers: a tiny Llama written as GGUF, converted once to safetensors, distilled from; bad files rejected."""

import logging

import pytest
import torch
from gguf_writer import write_tiny_gguf

from hf_distill import DistillationConfig, DistillationTrainer, create_student
from hf_distill.gguf import SOURCE_RECORD, convert_gguf


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8.gguf"
    return path, write_tiny_gguf(path)


def test_conversion_round_trip_and_reuse(gguf_file, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original = gguf_file
    with caplog.at_level(logging.INFO, logger="hf_distill"):
        folder = convert_gguf(path, tmp_path / "cache")
    assert (folder / "model.safetensors").is_file() and (folder / SOURCE_RECORD).is_file()
    assert any("Converted GGUF teacher" in r.getMessage() for r in caplog.records)
    loaded = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert getattr(loaded.config, "quantization_config", None) is None  # plain fp32 weights now
    loaded.float()  # a model still marked as quantized refuses this
    ids = torch.tensor([[5, 9, 77, 100, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, original(ids).logits, atol=1e-5)
    # byte-level symbols at their byte values, then the one merge "Ġ t" (id 256)
    assert AutoTokenizer.from_pretrained(folder)("hello t").input_ids == [*b"hello", 256]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_distill"):
        assert convert_gguf(path, tmp_path / "cache") == folder  # converted once: the copy is reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert any("using its converted copy" in r.getMessage() for r in caplog.records)


def test_gguf_teacher_path_distils(gguf_file, tmp_path):
    path, original = gguf_file
    student = create_student(original, num_layers=1)
    ids = torch.randint(0, 256, (8, 10))
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * 10, "labels": row.tolist()} for row in ids]
    args = DistillationConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to="none"
    )
    trainer = DistillationTrainer(model=student, teacher=str(path), args=args, train_dataset=data)
    assert (tmp_path / "run" / "gguf_teacher" / "tiny-llama.Q8" / "model.safetensors").is_file()
    with torch.no_grad():
        assert torch.allclose(trainer.teacher(ids[:1]).logits, original(ids[:1]).logits, atol=1e-5)
    assert trainer.train().training_loss > 0


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"PK\x03\x04 not gguf", "is not a GGUF file"), (b"GGUF\x03\x00\x00\x00", "transformers could not read")],
)
def test_bad_gguf_files_are_clear_errors(tmp_path, content, message):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        convert_gguf(bad, tmp_path / "cache")
    assert not (tmp_path / "cache" / "broken").exists()
    with pytest.raises(ValueError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "cache")
