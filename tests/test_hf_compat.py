"""The cache keyword (`past_key_values=` before transformers 5.20, `cache=` since) is read from transformers itself.

Run on both sides of the rename: with the installed transformers, and with a newer one first on
the path (`pip install --target /tmp/tf524 "transformers==5.24.*" --no-deps`, then
`PYTHONPATH=/tmp/tf524 pytest tests/test_hf_compat.py tests/test_hf_reuse.py ...`).
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_reuse import store_config  # noqa: E402

from tierkv_connectors.hf import PrefixNotUsedError, TierKV, cache_argument  # noqa: E402
from tierkv_connectors.hf.compat import CACHE_KEYWORD, given_cache  # noqa: E402

BT = 16
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llama() -> transformers.PreTrainedModel:
    torch.manual_seed(7)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY)).eval()


def test_the_keyword_is_the_one_the_models_forward_takes() -> None:
    assert CACHE_KEYWORD in ("cache", "past_key_values")
    assert CACHE_KEYWORD in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    assert cache_argument(None) == {CACHE_KEYWORD: None}


def test_given_cache_reads_either_name() -> None:
    marker = object()
    assert given_cache({CACHE_KEYWORD: marker}) is marker
    assert given_cache({"past_key_values": marker}) is marker
    assert given_cache({"cache": marker}) is marker
    assert given_cache({"use_cache": True}) is None


def test_reuse_reaches_the_model_through_generate() -> None:
    """The failure the rename caused: the watch read the old name, saw no cache, and recomputed every prompt."""
    model = llama()
    prompt = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with TierKV(model, store_config(model, 64, 64), block_tokens=BT) as tkv:
        tkv.generate(prompt, max_new_tokens=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # "tierkv recomputed the whole prompt" fails the test
            out = tkv.generate(prompt, max_new_tokens=6)
        assert out.reused_tokens == [32] and out.recomputed == ""
        plain = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        assert torch.equal(out.sequences, plain)
        # Driving generate yourself: the helper hands the cache over under this transformers' name.
        cache = tkv.cache(prompt)
        mine = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              **cache_argument(cache))
        assert cache.prefilled and cache.reused_tokens == [32] and torch.equal(mine, plain)


def test_a_cache_passed_under_the_other_name_is_used_or_caught() -> None:
    """Before 5.20 a forward's `**kwargs` swallows `cache=`: the watch sees the cache unused and raises.
    Since 5.20 `past_key_values=` is mapped onto `cache=`: the watch sees it, and the prefix is used."""
    model = llama()
    prompt = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    with TierKV(model, store_config(model, 64, 64), block_tokens=BT) as tkv:
        tkv.generate(prompt, max_new_tokens=1)
        cache = tkv.cache(prompt)
        with torch.no_grad():
            if CACHE_KEYWORD == "past_key_values":
                with pytest.raises(PrefixNotUsedError, match="did not write the prompt's KV"):
                    model(prompt[:, 32:], cache=cache)
                assert not cache.prefilled
            else:
                with pytest.warns(FutureWarning, match="past_key_values"):
                    model(prompt[:, 32:], past_key_values=cache)
                assert cache.prefilled
