"""A random-weight Llama saved as a model directory vLLM can load offline, for examples and benchmarks.

vLLM loads models from files, so the examples, the tests and the multi-turn benchmark need a
directory with weights, a config and a tokenizer; downloading one is not always possible (CI,
air-gapped machines). The tokenizer is a word-level vocabulary `w3 w4 ...`, so any token id
sequence round-trips through text.
"""

from __future__ import annotations

from pathlib import Path


def save_random_llama(path: Path, *, hidden: int = 64, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                      head_dim: int = 32, vocab: int = 512, dtype: str = "float32", seed: int = 0) -> Path:
    """Write the model under `path` (created) and return it. head_dim >= 32 for vLLM's CPU attention."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, dtype=dtype)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(path)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path
