"""transformers decode under a page budget on the GPU: the paged Triton attention and the manager's CUDA graphs.

Exact mode must give the tokens plain `generate` gives (float32, head_dim 128: the Triton
kernel's shape), and an approximate budget must run and hold its pages, with the steps
replayed from graphs. Run on the GPU machine: `python -m pytest -m gpu tests/gpu -q`.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierkv import StoreConfig  # noqa: E402
from tierkv_connectors.hf import TierKV, cache_argument, describe_model, tierkv_attention_for  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BT, NEW = 16, 24


def model() -> transformers.PreTrainedModel:
    torch.manual_seed(99)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).cuda().eval()


def store(m: transformers.PreTrainedModel) -> StoreConfig:
    bb = describe_model(m).layout(BT).block_bytes
    return StoreConfig(device_bytes=256 * bb, host_bytes=256 * bb, device="cuda")


def test_exact_mode_on_the_gpu_is_token_identical_to_dense_decode() -> None:
    m = model()
    ids = torch.randint(3, 512, (1, 600), generator=torch.Generator().manual_seed(5)).cuda()
    plain = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    with TierKV(m, store(m), block_tokens=BT, decode_budget=1.0) as tkv:
        out = tkv.generate(ids, max_new_tokens=NEW, generation_config=transformers.GenerationConfig(do_sample=False))
    assert torch.equal(out.sequences, plain)


def test_an_eighth_of_the_pages_runs_from_graphs_on_the_gpu() -> None:
    m = model()
    ids = torch.randint(3, 512, (2, 1000), generator=torch.Generator().manual_seed(6)).cuda()
    with TierKV(m, store(m), block_tokens=BT, decode_budget=0.125) as tkv:
        cache = tkv.cache(ids, torch.ones_like(ids), load=False, save_prompt=False, max_new_tokens=NEW)
        with tierkv_attention_for(m):
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, **cache_argument(cache))
    manager = cache.manager  # type: ignore[attr-defined]
    assert out.shape == (2, 1000 + NEW)
    assert manager.graphs is not None and manager.graphs.replays > 0
    pages = -(-(1000 + NEW) // BT)
    assert all(manager.resident_pages(layer, s) <= -(-pages // 8) + 1 for layer in range(2) for s in range(2))
