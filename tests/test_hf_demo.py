"""The real-model demo: a chat run with and without tierkv gives the same replies and reuses the history."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierkv_connectors.hf.demo import DemoOptions, run_demo  # noqa: E402


def test_default_demo_model_and_tokenizer_reuse_the_conversation() -> None:
    pytest.importorskip("mistral_common")
    out = io.StringIO()
    report = run_demo(DemoOptions(turns=3, new_tokens=4, document_tokens=160, device="cpu"), out=out)
    text = out.getvalue()
    assert report.identical and "replies identical with and without tierkv: yes" in text
    assert "THE WEIGHTS ARE RANDOM" in text and "mistral-common" in text
    assert [t.reused_tokens for t in report.turns][0] == 0
    # Turns 2 and 3 resend the whole history: all of it up to the last full block is reused.
    for turn in report.turns[1:]:
        assert turn.prompt_tokens - turn.reused_tokens <= 16 + 16
    assert report.saved_tokens > 0
    assert sum(report.hits_by_tier.values()) * 16 >= report.saved_tokens


def _local_model_dir(path: Path) -> Path:
    """A tiny Llama saved with a word-level tokenizer and a chat template, like a downloaded model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>"] + [f"w{i}" for i in range(250)]
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
    options = DemoOptions(model_path=str(_local_model_dir(tmp_path)), turns=2, new_tokens=3, document_tokens=100, device="cpu")
    report = run_demo(options, out=out)
    text = out.getvalue()
    assert report.identical and not report.random_weights
    assert f"model: LlamaForCausalLM from {tmp_path}" in text and f"tokenizer: TokenizersBackend from {tmp_path}" in text
    assert "RANDOM" not in text
    assert report.turns[1].reused_tokens > 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("turns", 0, "turns must be a positive int"),
        ("turns", 99, "turns must be at most"),
        ("new_tokens", 1.5, "new_tokens must be a positive int"),
        ("device", "tpu", "device must be"),
    ],
)
def test_bad_demo_options_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoOptions(**{field: value})
