"""``vllm`` backend: ray.data.llm processor wiring (runs anywhere) and a real vLLM run (GPU + vllm only)."""

from __future__ import annotations

import importlib.util

import pytest

from gptfl_ray.config import ExpanderConfig, PromptsConfig
from gptfl_ray.prompts import build_prompt_table, count_fallbacks, expand_prompts
from gptfl_ray.prompts.backend_vllm import (
    ERROR_COLUMN,
    build_vllm_processor,
    engine_output,
    postprocess_row,
    preprocess_row,
    processor_config,
)
from tests.tiny_models import build_tiny_causal_lm

COLUMNS = ["label", "label_name", "label_text", "index", "prompt", "guidance_scale", "seed", "template"]


def _row() -> dict:
    cfg = PromptsConfig(num_per_class=1, seed=5)
    return build_prompt_table(cfg, ["cat"], modality="image", label_text={}).to_pylist()[0]


def test_preprocess_keeps_template_and_seeds_sampling():
    row = _row()
    cfg = ExpanderConfig(
        backend="vllm", model="m", system_prompt="be brief", temperature=0.7, max_new_tokens=9
    )
    chat = preprocess_row(row, cfg=cfg, chat=True)
    assert chat["template_prompt"] == "a photo of a cat"
    assert chat["messages"][0] == {"role": "system", "content": "be brief"}
    assert "a photo of a cat" in chat["messages"][1]["content"]
    assert chat["sampling_params"] == {
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 9,
        "seed": row["seed"],
    }
    plain = preprocess_row(row, cfg=cfg.model_copy(update={"temperature": 0.0}), chat=False)
    assert "messages" not in plain and "a photo of a cat" in plain["prompt"]
    assert "seed" not in plain["sampling_params"]  # greedy


def test_postprocess_success_and_error_rows():
    row = _row()
    data = {
        **row,
        "template_prompt": row["prompt"],
        "prompt": "<chat>rendered</chat>",
        "generated_text": " A cat.",
    }
    ok = postprocess_row({**engine_output(data, columns=COLUMNS), ERROR_COLUMN: ""}, columns=COLUMNS)
    assert ok == {**row, "raw_expansion": " A cat.", "expansion_error": None}
    # error rows bypass the processor's postprocess and arrive with every engine field
    failed = postprocess_row({**data, "messages": [], ERROR_COLUMN: "CUDA OOM"}, columns=COLUMNS)
    assert failed == {**row, "raw_expansion": None, "expansion_error": "CUDA OOM"}


def test_processor_wiring_against_ray_data_llm(tmp_path, ray_session):
    model = str(build_tiny_causal_lm(tmp_path / "lm"))
    env = {"env_vars": {"X": "1"}}
    cfg = ExpanderConfig(backend="vllm", model=model, engine_kwargs={"max_model_len": 256}, batch_size=16)
    cfg = cfg.model_copy(update={"concurrency": 2, "runtime_env": env})
    config = processor_config(cfg)
    assert config.model_source == model and config.batch_size == 16 and config.concurrency == 2
    assert config.should_continue_on_error is True  # a failed row falls back instead of failing the job
    assert config.runtime_env == env
    assert config.engine_kwargs["max_model_len"] == 256
    assert cfg.engine_kwargs == {"max_model_len": 256}  # Ray's validator must not mutate our config
    stages = build_vllm_processor(cfg, COLUMNS).list_stage_names()
    assert stages == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    plain = cfg.model_copy(update={"chat": False})
    assert build_vllm_processor(plain, COLUMNS).list_stage_names()[0] == "TokenizeStage"


def _gpu_and_vllm() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_and_vllm(), reason="needs vllm installed and a CUDA GPU (vLLM runs only there)")
def test_vllm_expansion_end_to_end(tmp_path, ray_session):
    import ray.data

    model = str(build_tiny_causal_lm(tmp_path / "lm", hidden_size=128, num_attention_heads=2))
    rows = build_prompt_table(PromptsConfig(num_per_class=8), ["cat", "dog"], modality="image", label_text={})
    engine = {"max_model_len": 256, "gpu_memory_utilization": 0.2, "enforce_eager": True}
    cfg = ExpanderConfig(
        backend="vllm",
        model=model,
        max_new_tokens=12,
        batch_size=8,
        engine_kwargs=engine,
        max_fallback_fraction=1.0,  # a random tiny LM: most rows fall back
    )

    def run():
        out = expand_prompts(ray.data.from_arrow(rows), cfg).take_all()
        return sorted(out, key=lambda r: (r["label"], r["index"]))

    first, again = run(), run()
    assert len(first) == 16
    assert [r["prompt"] for r in first] == [r["prompt"] for r in again]  # per-request seeds
    assert 0 < count_fallbacks(first) <= 16
    for r in first:
        if not r["expansion_fallback"]:
            assert r["label_name"] in r["prompt"].split()
