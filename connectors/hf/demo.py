"""`tierkv demo`: a multi-turn chat about a long document, run with and without tierkv.

Every turn's prompt is the whole conversation so far, tokenized by the chat template, as a chat
server would send it. Without tierkv the model recomputes the whole prompt every turn; with
tierkv only what follows the longest stored prefix. The demo prints time to first token per
turn, prefill tokens saved, and hits per tier, and checks that the replies are identical.

With no model given it builds a small Llama-architecture model with random weights (the replies
are gibberish; the timings and the reuse are real) and uses the Mistral v3 SentencePiece
tokenizer shipped in the `mistral-common` package (Apache-2.0), so it runs offline.
`model_path` runs any local transformers model directory with its own tokenizer instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from tierkv import StoreConfig, parse_bytes

from . import TierKV

# The demo model: small enough for a 2-core CPU, large enough that prefill dominates decode.
DEMO_LAYERS = 4
DEMO_HIDDEN = 512
DEMO_HEADS = 8
DEMO_KV_HEADS = 4
DEMO_INTERMEDIATE = 1536
DEMO_MAX_POSITIONS = 8192


def build_demo_model(
    vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LlamaForCausalLM:
    """The demo's Llama-architecture model, random weights drawn from `seed`."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=DEMO_HIDDEN,
        intermediate_size=DEMO_INTERMEDIATE,
        num_hidden_layers=DEMO_LAYERS,
        num_attention_heads=DEMO_HEADS,
        num_key_value_heads=DEMO_KV_HEADS,
        max_position_embeddings=DEMO_MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    # transformers types `to` as `@wraps(nn.Module.to)`, whose _Wrapped signature keeps the unbound `self`
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]


@dataclass(frozen=True)
class DemoOptions:
    """Settings of `run_demo`; the CLI maps its flags onto these fields.

    model_path: a local transformers model directory (weights and tokenizer); None builds the
      random-weight demo model. turns: chat turns. new_tokens: tokens generated per reply.
    document_tokens: length of the document the chat is about (the long shared prefix).
    device: "cpu", "cuda" or None (CUDA when available). device_bytes / host_bytes: tier sizes
      of the store; the default device tier is small so that some hits come from the host tier.
    """

    model_path: str | None = None
    turns: int = 4
    new_tokens: int = 16
    document_tokens: int = 768
    block_tokens: int = 16
    device: str | None = None
    device_bytes: int | str = "1MiB"
    host_bytes: int | str = "256MiB"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("turns", "new_tokens", "document_tokens", "block_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoOptions.{name} must be a positive int, got {value!r}")
        if self.turns > len(QUESTIONS):
            raise ValueError(f"DemoOptions.turns must be at most {len(QUESTIONS)}, got {self.turns}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"DemoOptions.device must be 'cpu', 'cuda' or None, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("DemoOptions.device is 'cuda' but CUDA is not available here")


@dataclass
class TurnResult:
    prompt_tokens: int
    reused_tokens: int
    ttft_plain_s: float
    ttft_tierkv_s: float
    identical: bool


@dataclass
class DemoReport:
    """What the demo measured; `run_demo` also prints it."""

    turns: list[TurnResult] = field(default_factory=list)
    hits_by_tier: dict[str, int] = field(default_factory=dict)
    random_weights: bool = True

    @property
    def prefill_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.turns)

    @property
    def saved_tokens(self) -> int:
        return sum(t.reused_tokens for t in self.turns)

    @property
    def identical(self) -> bool:
        return all(t.identical for t in self.turns)


class ChatTokenizer(Protocol):
    """Chat messages, as `(role, text)` with role "system", "user" or "assistant", to prompt token ids."""

    description: str
    eos_id: int

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class MistralV3Tokenizer:
    """Mistral's v3 SentencePiece tokenizer and chat format, from the files `mistral-common` ships."""

    def __init__(self) -> None:
        from importlib.metadata import version

        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self._messages: dict[str, type[SystemMessage | UserMessage | AssistantMessage]] = {
            "system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage
        }
        self._request = ChatCompletionRequest
        self._tokenizer = MistralTokenizer.v3()
        inner = self._tokenizer.instruct_tokenizer.tokenizer
        self.vocab_size = inner.n_words
        self.eos_id = inner.eos_id
        self.description = (
            f"Mistral v3 SentencePiece tokenizer from mistral-common {version('mistral-common')} "
            f"(Apache-2.0), {self.vocab_size} tokens"
        )

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        request = self._request(messages=[self._messages[role](content=text) for role, text in messages])
        return self._tokenizer.encode_chat_completion(request).tokens

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))


class LocalTokenizer:
    """The tokenizer of a local model directory, with its chat template when it has one."""

    def __init__(self, path: str) -> None:
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.eos_id = self._tokenizer.eos_token_id if self._tokenizer.eos_token_id is not None else 0
        has_template = bool(getattr(self._tokenizer, "chat_template", None))
        self._template = has_template
        self.description = f"{type(self._tokenizer).__name__} from {path}" + (
            "" if has_template else " (no chat template: plain 'User:/Assistant:' turns)"
        )

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if self._template:
            chat = [{"role": role, "content": text} for role, text in messages]
            return list(self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
        text = "".join(f"{role.capitalize()}: {content}\n" for role, content in messages) + "Assistant:"
        return self._tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string (lists are for batches)
        return text


_DOCUMENT_SENTENCES = [
    "The harbour town of Velmora keeps its records in a lighthouse that no longer guides ships.",
    "Every spring the archivists climb the spiral stairs to copy the ledgers before the salt eats the ink.",
    "The ledgers list cargoes of copper, dried figs, indigo cloth and, once, a crated piano bound for the capital.",
    "A storm in the year of the long winter flooded the lower rooms and washed away three decades of entries.",
    "Since then the town has kept two copies of everything, one in the lighthouse and one in the granary.",
    "The granary copy is written in a faster hand, with abbreviations that only two clerks can still read.",
    "Merchants pay a small fee to consult the ledgers, and the fee funds the lamp oil that is no longer needed.",
    "Children are told that the lamp is still lit on the night the piano arrived, though nobody remembers why.",
]

QUESTIONS = [
    "Summarise the document in two sentences.",
    "Why does the town keep two copies of its records?",
    "Who can still read the granary copy?",
    "What happened in the year of the long winter?",
    "What does the consultation fee pay for?",
    "Why is the lamp said to be lit once a year?",
]


def _document(tokenizer: ChatTokenizer, target_tokens: int) -> str:
    """Numbered sections of the sentences above until the text is about `target_tokens` long."""
    sections: list[str] = []
    while len(tokenizer.encode_chat([("user", "\n".join(sections))])) < target_tokens:
        i = len(sections)
        sections.append(f"Section {i + 1}. {_DOCUMENT_SENTENCES[i % len(_DOCUMENT_SENTENCES)]}")
    return "\n".join(sections)


class _FirstTokenClock(BaseStreamer):
    """Notes when `generate` hands out its first new token (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def load_chat_model(model_path: str | None, device: str, seed: int = 0) -> tuple[PreTrainedModel, ChatTokenizer, str]:
    """A model, its chat tokenizer and a line describing them: from `model_path`, else the random demo model."""
    if model_path is None:
        tokenizer = MistralV3Tokenizer()
        model = build_demo_model(tokenizer.vocab_size, seed=seed, device=device)
        about = (
            f"random-weight Llama-architecture model ({DEMO_LAYERS} layers, hidden {DEMO_HIDDEN}, "
            f"{DEMO_HEADS} heads / {DEMO_KV_HEADS} KV heads, float32). THE WEIGHTS ARE RANDOM: replies are "
            "gibberish; the timings and the reuse are real."
        )
        return model, tokenizer, about
    local = LocalTokenizer(model_path)
    # transformers types `to` as `@wraps(nn.Module.to)`, whose _Wrapped signature keeps the unbound `self`
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).to(device).eval()  # type: ignore[arg-type]
    return model, local, f"{type(model).__name__} from {model_path} ({model.dtype})"


def _generation_config(new_tokens: int, eos_id: int) -> GenerationConfig:
    # Greedy and a fixed length: both runs must produce the same replies for the comparison to mean anything.
    return GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            eos_token_id=eos_id, pad_token_id=eos_id)


def _chat(
    model: PreTrainedModel,
    tokenizer: ChatTokenizer,
    document: str,
    options: DemoOptions,
    tkv: TierKV | None,
) -> list[tuple[list[int], list[int], float, int]]:
    """Run the conversation; per turn: prompt ids, reply ids, time to first token, reused tokens."""
    config = _generation_config(options.new_tokens, tokenizer.eos_id)
    messages: list[tuple[str, str]] = []
    turns = []
    for turn, question in enumerate(QUESTIONS[: options.turns]):
        messages.append(("user", f"Here is a document.\n\n{document}\n\n{question}" if turn == 0 else question))
        prompt = tokenizer.encode_chat(messages)
        ids = torch.tensor([prompt], device=model.device)
        clock = _FirstTokenClock()
        start = time.perf_counter()
        with torch.no_grad():
            if tkv is None:
                # PreTrainedModel lacks GenerationMixin in transformers 5 (the causal-LM classes add it)
                out = model.generate(  # type: ignore[operator]
                    ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=clock
                )
                reused = 0
            else:
                result = tkv.generate(ids, generation_config=config, streamer=clock, store_generated=True)
                out, reused = result.sequences, result.reused_tokens[0]
        assert clock.first_token_at is not None
        reply = out[0, len(prompt):].tolist()
        turns.append((prompt, reply, clock.first_token_at - start, reused))
        messages.append(("assistant", tokenizer.decode(reply)))
    return turns


def run_demo(options: DemoOptions | None = None, out: TextIO = sys.stdout) -> DemoReport:
    """Run the chat without and then with tierkv, print the comparison, and return it."""
    options = options or DemoOptions()
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, about = load_chat_model(options.model_path, device, options.seed)
    document = _document(tokenizer, options.document_tokens)
    store_config = StoreConfig(device_bytes=parse_bytes(options.device_bytes, "device_bytes"),
                               host_bytes=parse_bytes(options.host_bytes, "host_bytes"), device=device)
    print("tierkv demo: multi-turn chat about a long document, with and without prefix reuse", file=out)
    print(f"model: {about}", file=out)
    print(f"tokenizer: {tokenizer.description}", file=out)
    with TierKV(model, store_config, block_tokens=options.block_tokens) as tkv:
        layout = tkv.layout
        print(
            f"device: {device}, torch threads {torch.get_num_threads()}; store: device tier "
            f"{store_config.device_bytes / 2**20:.1f} MiB, host tier {store_config.host_bytes / 2**20:.0f} MiB, "
            f"blocks of {layout.block_tokens} tokens ({layout.block_bytes / 1024:.0f} KiB)",
            file=out,
        )
        # Warm-up at full length, so neither run pays for first-call allocations and kernel selection.
        warm = torch.tensor([tokenizer.encode_chat([("user", f"{document}\n\n{QUESTIONS[-1]}")])], device=model.device)
        with torch.no_grad():
            # PreTrainedModel lacks GenerationMixin in transformers 5 (the causal-LM classes add it)
            model.generate(  # type: ignore[operator]
                warm, attention_mask=torch.ones_like(warm), generation_config=_generation_config(2, tokenizer.eos_id)
            )
        plain = _chat(model, tokenizer, document, options, None)
        reuse = _chat(model, tokenizer, document, options, tkv)
        stats = tkv.store.stats()
    report = DemoReport(random_weights=options.model_path is None)
    for (p_ids, p_reply, p_ttft, _), (r_ids, r_reply, r_ttft, reused) in zip(plain, reuse):
        report.turns.append(TurnResult(len(p_ids), reused, p_ttft, r_ttft, p_ids == r_ids and p_reply == r_reply))
    report.hits_by_tier = {name: tier["hits"] for name, tier in stats["tiers"].items()}
    _print_report(report, out)
    return report


def _print_report(report: DemoReport, out: TextIO) -> None:
    print(f"\n{'turn':>4} {'prompt':>7} {'reused':>7} {'computed':>9} {'TTFT plain':>11} {'TTFT tierkv':>12} {'speedup':>8}",
          file=out)
    for i, t in enumerate(report.turns, 1):
        print(
            f"{i:>4} {t.prompt_tokens:>7} {t.reused_tokens:>7} {t.prompt_tokens - t.reused_tokens:>9} "
            f"{t.ttft_plain_s * 1e3:>8.0f} ms {t.ttft_tierkv_s * 1e3:>9.0f} ms {t.ttft_plain_s / t.ttft_tierkv_s:>7.2f}x",
            file=out,
        )
    share = report.saved_tokens / report.prefill_tokens if report.prefill_tokens else 0.0
    plain = sum(t.ttft_plain_s for t in report.turns)
    reused = sum(t.ttft_tierkv_s for t in report.turns)
    print(f"\nprefill tokens saved: {report.saved_tokens} of {report.prefill_tokens} ({share:.0%})", file=out)
    print(f"time to first token, all turns: {plain * 1e3:.0f} ms plain, {reused * 1e3:.0f} ms with tierkv", file=out)
    print("store hits by tier (blocks): " + ", ".join(f"{k} {v}" for k, v in report.hits_by_tier.items()), file=out)
    print(f"replies identical with and without tierkv: {'yes' if report.identical else 'NO'}", file=out)
    if report.random_weights:
        print("note: the model's weights are random; only the timings and reuse figures mean anything.", file=out)
