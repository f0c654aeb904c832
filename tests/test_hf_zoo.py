"""The whole zoo: every causal-LM class transformers registers is either served token-identical with reuse
or refused with a reason, and docs/transformers.md's table says which.

The list is transformers' own registry (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), not a hand-kept
one; `tierkv_connectors.hf.zoo` builds each class tiny (2 layers, hidden 64, or one layer per
kind of layer the architecture mixes) and runs five reuse cases against plain greedy generate.
About 180 classes; a couple of minutes on two CPU cores.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from tierkv_connectors.hf import zoo  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _table_module():
    spec = importlib.util.spec_from_file_location("hf_zoo_table", ROOT / "scripts" / "hf_zoo_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep() -> list[zoo.ZooResult]:
    logging.disable(logging.WARNING)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return zoo.sweep()
    finally:
        transformers.logging.set_verbosity(verbosity)
        logging.disable(logging.NOTSET)


def test_the_sweep_walks_the_whole_registry(sweep: list[zoo.ZooResult]) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert {r.class_name for r in sweep} == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    assert len(sweep) > 150


def test_every_causal_lm_is_served_token_identical_or_refused_with_a_reason(sweep: list[zoo.ZooResult]) -> None:
    bad = [f"{r.model_type} ({r.class_name}): {r.outcome}: {r.reason}" for r in sweep if not r.ok]
    assert not bad, "\n".join(bad)
    for r in sweep:
        if r.outcome == "refused":
            assert r.class_name in r.reason and len(r.reason) > len(r.class_name) + 40, r.reason
        else:
            assert r.reused[0] == 0 and all(r.reused[1:]), f"{r.class_name}: no reuse in {r.reused}"
    served = {r.model_type for r in sweep if r.outcome == "served"}
    # The architectures of the classes and of the sliding-window work are among them.
    assert {"llama", "mpt", "dbrx", "phi3", "phimoe", "mistral", "gemma2", "gemma3_text", "cohere2", "gpt_oss",
            "olmo3", "starcoder2", "llama4"} <= served


def test_docs_table_is_the_sweep(sweep: list[zoo.ZooResult]) -> None:
    table = _table_module()
    text = (ROOT / "docs" / "transformers.md").read_text()
    documented = table.parse_table(text)
    assert documented, "docs/transformers.md has no zoo table: run scripts/hf_zoo_table.py --write"
    if table.table_version(text) != transformers.__version__:
        pytest.skip(f"the table was made with transformers {table.table_version(text)}, this is {transformers.__version__}")
    assert documented == {r.class_name: r.outcome for r in sweep}, "stale table: run scripts/hf_zoo_table.py --write"
