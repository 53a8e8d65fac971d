"""The GPU end-to-end measurement's own checks, run here on the CPU build of llama.cpp.

tools/measure/bench_gpu_llama.py is what runs on the H200 (runtime/kernels/llama_cuda_run.sh); its
claims (``raw`` resumes to the native resume's logits bit for bit, extend through the spare sequence
too) must hold on any build, so they are checked here with the real SmolLM2 and with a synthetic GGUF
of SmolLM2's shape (tools/measure/synthetic_gguf.py), the kind the GPU run uses.
"""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from deltakv_tools.measure import bench_gpu_llama, gpu_llama_probe, synthetic_gguf  # noqa: E402
from deltakv_tools.models import smollm2  # noqa: E402


def test_raw_resume_and_extend_give_the_native_logits(tmp_path):
    row = bench_gpu_llama.bench_model(str(smollm2()), 96, repeat=1, flash_attn=True, codecs=["raw"], tmp=tmp_path)
    assert row["raw logits equal"] is True and row["raw KL"] == 0.0
    assert row["raw tokens equal"] == bench_gpu_llama.CONTINUATION
    assert row["raw extend path"] == "spare-sequence"
    assert row["raw extended logits equal"] is True
    assert row["raw extended tokens equal"] == bench_gpu_llama.CONTINUATION


def test_synthetic_model_of_smollm2_shape_loads_and_evaluates(tmp_path):
    skel_path = tmp_path / "smollm2.json.gz"
    synthetic_gguf.save_skeleton(synthetic_gguf.skeleton(smollm2()), skel_path)
    model = synthetic_gguf.write_synthetic(synthetic_gguf.load_skeleton(skel_path), tmp_path / "s.gguf")
    assert model.stat().st_size > 0
    gpu_llama_probe.run_step(str(model), "cpu-layers")  # raises (or crashes the test) if llama.cpp refuses it
