"""StoreConfig: one dataclass from a dict, a JSON/YAML file or TIERKV_* variables, validated once."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_layout

import tierkv
from tierkv import BlockStore, ConfigError, Namespace, StoreConfig, parse_bool, parse_bytes, parse_float, parse_int


def test_defaults() -> None:
    c = StoreConfig()
    assert c.device_bytes == 1 << 30 and c.host_bytes == 4 << 30
    assert c.device is None and c.pin_host is None


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1GiB", 1 << 30),
        ("512MiB", 512 << 20),
        ("4 GB", 4_000_000_000),
        ("1.5GiB", 3 << 29),
        ("2kib", 2048),
        (" 7 ", 7),
        ("10b", 10),
        ("3TB", 3 * 10**12),
        ("0", 0),
        (4096, 4096),
        (4096.0, 4096),
    ],
)
def test_size_strings(text: object, expected: int) -> None:
    assert parse_bytes(text, "device_bytes") == expected
    assert StoreConfig(device_bytes=text).device_bytes == expected


@pytest.mark.parametrize("value", ["1.5 parsecs", "GiB", "", "one", "1e9", True, 1.5, None, [1]])
def test_unparseable_sizes_name_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^host_bytes: expected a size"):
        StoreConfig(host_bytes=value)


@pytest.mark.parametrize("value", [-1, -4096.0, -(1 << 40)])
def test_negative_sizes_name_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^device_bytes: must be >= 0"):
        StoreConfig(device_bytes=value)


@pytest.mark.parametrize("value", ["cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_accepts_cpu_and_cuda(value: str) -> None:
    assert StoreConfig(device=value).device == value


@pytest.mark.parametrize("value", ["tpu", "CUDA", "cuda:x", "cuda:", "gpu", 0])
def test_bad_device_names_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^device: expected 'cpu', 'cuda' or 'cuda:N'"):
        StoreConfig(device=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "expected"),
                         [("yes", True), ("ON", True), ("1", True), ("false", False), ("off", False), (False, False)])
def test_pin_host_accepts_bool_words(value: object, expected: bool) -> None:
    assert StoreConfig(pin_host=value).pin_host is expected


@pytest.mark.parametrize("value", ["maybe", 2, "2"])
def test_bad_pin_host_names_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^pin_host: expected true or false"):
        StoreConfig(pin_host=value)  # type: ignore[arg-type]


def test_config_is_frozen_and_round_trips() -> None:
    c = StoreConfig(device_bytes="1MiB", host_bytes="2MiB", device="cpu", pin_host=False)
    with pytest.raises(AttributeError):
        c.device_bytes = 5  # type: ignore[misc]
    assert StoreConfig.from_dict(c.to_dict()) == c
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()


# -- from_dict ------------------------------------------------------------------------


def test_from_dict() -> None:
    c = StoreConfig.from_dict({"device_bytes": "64MiB", "host_bytes": 1 << 30, "device": "cpu"})
    assert (c.device_bytes, c.host_bytes, c.device) == (64 << 20, 1 << 30, "cpu")


def test_from_dict_names_every_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['hots_bytes', 'zzz'\]; known fields are .*'host_bytes'"):
        StoreConfig.from_dict({"device_bytes": 1, "hots_bytes": 2, "zzz": 3})


def test_from_dict_reports_bad_values_by_field() -> None:
    with pytest.raises(ConfigError, match="^host_bytes: must be >= 0"):
        StoreConfig.from_dict({"host_bytes": -5})


# -- from_file ------------------------------------------------------------------------


def test_from_json_file(tmp_path: Path) -> None:
    p = tmp_path / "tierkv.json"
    p.write_text(json.dumps({"device_bytes": "2MiB", "host_bytes": 8 << 20, "pin_host": False}))
    c = StoreConfig.from_file(p)
    assert (c.device_bytes, c.host_bytes, c.pin_host) == (2 << 20, 8 << 20, False)
    assert StoreConfig.from_file(str(p)) == c


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_from_yaml_file(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"tierkv{suffix}"
    p.write_text("device_bytes: 1GiB\nhost_bytes: 4 GB\ndevice: cpu\npin_host: no\n")
    c = StoreConfig.from_file(p)
    assert (c.device_bytes, c.host_bytes, c.device, c.pin_host) == (1 << 30, 4 * 10**9, "cpu", False)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"cannot read config file {p}"):
        StoreConfig.from_file(p)


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        StoreConfig.from_file(tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [("bad.json", '{"device_bytes": 1,', "json"), ("bad.yaml", "device_bytes: [1, 2\n", "yaml"),
     ("bad.conf", "device_bytes=1", "conf")],
)
def test_bad_syntax_is_a_config_error(tmp_path: Path, name: str, text: str, kind: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file {p} is not valid {kind}"):
        StoreConfig.from_file(p)


@pytest.mark.parametrize(
    ("name", "text"),
    [("list.json", "[1, 2]"), ("str.yaml", "just a string\n"), ("empty.yaml", ""), ("null.json", "null")],
)
def test_non_mapping_file_is_a_config_error(tmp_path: Path, name: str, text: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        StoreConfig.from_file(p)


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("device_byte: 1GiB\n")
    with pytest.raises(ConfigError, match=r"\['device_byte'\]"):
        StoreConfig.from_file(p)


# -- from_env -------------------------------------------------------------------------


def test_from_env_mapping() -> None:
    env = {"TIERKV_DEVICE_BYTES": "1GiB", "TIERKV_HOST_BYTES": "2 GB", "TIERKV_PIN_HOST": "false", "PATH": "/bin"}
    c = StoreConfig.from_env(env)
    assert (c.device_bytes, c.host_bytes, c.pin_host) == (1 << 30, 2 * 10**9, False)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERKV_DEVICE_BYTES", "1GiB")
    monkeypatch.setenv("TIERKV_DEVICE", "cpu")
    c = StoreConfig.from_env()
    assert c.device_bytes == 1 << 30 and c.device == "cpu"


def test_from_env_overrides_base() -> None:
    c = StoreConfig.from_env({"TIERKV_HOST_BYTES": "3MiB"}, base={"device_bytes": 5, "host_bytes": 7})
    assert (c.device_bytes, c.host_bytes) == (5, 3 << 20)


@pytest.mark.parametrize("word", ["", "auto", "None"])
def test_from_env_auto_means_unset(word: str) -> None:
    assert StoreConfig.from_env({"TIERKV_DEVICE": word}, base={"device": "cpu"}).device is None


def test_from_env_unknown_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="environment variable TIERKV_DEVCE_BYTES names no config field"):
        StoreConfig.from_env({"TIERKV_DEVCE_BYTES": "1GiB"})


def test_from_env_ignores_program_variables(tmp_path: Path) -> None:
    p = tmp_path / "empty.json"
    p.write_text("{}")
    c = StoreConfig.from_env({"TIERKV_CONFIG": str(p), "TIERKV_LOG_LEVEL": "", "TIERKVX": "1"})
    assert c == StoreConfig()


def test_from_env_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match="^device_bytes: "):
        StoreConfig.from_env({"TIERKV_DEVICE_BYTES": "lots"})


# -- at store construction -------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_cuda_fails_at_store_construction(device: str) -> None:
    config = StoreConfig(device_bytes=4096, host_bytes=4096, device=device)  # valid as data
    with pytest.raises(ConfigError, match=rf"device: '{device}' was asked for but CUDA is not available"):
        BlockStore(tiny_layout(), Namespace(model="m"), config)


def test_capacities_become_whole_slots() -> None:
    layout = tiny_layout()
    bb = layout.block_bytes
    config = StoreConfig(device_bytes=3 * bb + bb - 1, host_bytes=bb - 1, device="cpu")
    with BlockStore(layout, Namespace(model="m"), config) as store:
        assert store.tiers[0].num_slots == 3 and store.tiers[1].num_slots == 0
        s = store.stats()["tiers"]
        assert s["device"]["capacity_bytes"] == 3 * bb and s["host"]["capacity_bytes"] == 0


# -- the shared parsers ------------------------------------------------------------------


def test_the_parsers_are_public() -> None:
    for name in ("parse_bool", "parse_bytes", "parse_float", "parse_int"):
        assert name in tierkv.__all__ and getattr(tierkv, name) is getattr(tierkv.config, name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1PiB", 1 << 50), ("2 pib", 2 << 50), ("1PB", 10**15), ("3 pb", 3 * 10**15), ("0.5PiB", 1 << 49),
     ("5TiB", 5 << 40), ("1KB", 1000), ("1KiB", 1024), ("1k", 1000), ("+4MiB", 4 << 20),
     ("9007199254740993", 2**53 + 1)],  # exact, not through a float
)
def test_parse_bytes_units(text: str, expected: int) -> None:
    assert parse_bytes(text, "disk_bytes") == expected


@pytest.mark.parametrize("value", [True, False, 1.5, "1.5.5GiB", "1 2MiB", "12XB", "1EiB", "0x10", "1_000", "inf", float("nan")])
def test_parse_bytes_refuses_non_sizes_naming_the_field_and_the_units(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^disk_bytes: expected a size such as 64MiB.*PiB\), got ") as e:
        parse_bytes(value, "disk_bytes")
    assert repr(value) in str(e.value)


@pytest.mark.parametrize("value", ["-1GiB", "-0.5B", -1])
def test_parse_bytes_refuses_negative_sizes(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^host_bytes: must be >= 0, got "):
        parse_bytes(value, "host_bytes")


@pytest.mark.parametrize(("value", "expected"), [(7, 7), ("12", 12), (" 3 ", 3), ("-2", -2), ("+5", 5), (0, 0)])
def test_parse_int_accepts_ints_and_decimal_strings(value: object, expected: int) -> None:
    assert parse_int(value, "n") == expected


@pytest.mark.parametrize("value", [True, False, "4.0", 4.0, "1e3", "0x10", "1_000", "", "  ", "four", None, "\u00b2", [1]])
def test_parse_int_refuses_bools_floats_and_other_spellings(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^io_threads: expected a whole number, got ") as e:
        parse_int(value, "io_threads")
    assert repr(value) in str(e.value)


@pytest.mark.parametrize(
    ("bounds", "value", "message"),
    [({"minimum": 1}, 0, r"^n: expected a whole number >= 1, got 0$"),
     ({"maximum": 9}, "10", r"^n: expected a whole number <= 9, got '10'$"),
     ({"minimum": 1, "maximum": 256}, 257, r"^n: expected a whole number from 1 to 256, got 257$"),
     ({"minimum": 1, "maximum": 256}, True, r"^n: expected a whole number from 1 to 256, got True$")],
)
def test_parse_int_names_its_bounds(bounds: dict[str, int], value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_int(value, "n", **bounds)
    for bound in bounds.values():  # the bounds themselves are in range
        assert parse_int(bound, "n", **bounds) == bound


@pytest.mark.parametrize(("value", "expected"), [(2, 2.0), ("0.5", 0.5), (" 2e-3 ", 0.002), (1.25, 1.25)])
def test_parse_float_accepts_numbers(value: object, expected: float) -> None:
    assert parse_float(value, "interval", above=0) == expected


@pytest.mark.parametrize("value", [0, "0", -1.0, True, "nan", "inf", float("-inf"), "soon", None])
def test_parse_float_refuses_non_numbers_and_values_at_or_below_the_bound(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^interval: expected a number > 0, got "):
        parse_float(value, "interval", above=0)


TRUE_WORDS = ["1", "true", "True", "TRUE", "yes", "Yes", "on", "ON", " on ", True, 1]
FALSE_WORDS = ["0", "false", "False", "no", "NO", "off", "Off", False, 0]


@pytest.mark.parametrize(("value", "expected"), [(w, True) for w in TRUE_WORDS] + [(w, False) for w in FALSE_WORDS])
def test_parse_bool_spellings(value: object, expected: bool) -> None:
    assert parse_bool(value, "verify_reads") is expected
    assert StoreConfig(verify_reads=value).verify_reads is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["maybe", "y", "n", "t", "", "2", 2, -1, 1.0, None, [True]])
def test_parse_bool_refuses_other_spellings_naming_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^flush_on_close: expected true or false \(or yes/no, on/off, 1/0\), got ") as e:
        parse_bool(value, "flush_on_close")
    assert repr(value) in str(e.value)


@pytest.mark.parametrize(("value", "expected"), [("8", 8), (" 16 ", 16), (1, 1), (256, 256)])
def test_io_threads_goes_through_parse_int(value: object, expected: int) -> None:
    assert StoreConfig(io_threads=value).io_threads == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, 257, True, "4.0", "many"])
def test_bad_io_threads_names_the_field_and_range(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^io_threads: expected a whole number from 1 to 256, got "):
        StoreConfig(io_threads=value)  # type: ignore[arg-type]


def test_every_bool_field_takes_the_same_words_from_the_environment() -> None:
    env = {"TIERKV_PIN_HOST": "on", "TIERKV_FLUSH_ON_CLOSE": "No", "TIERKV_VERIFY_READS": "0", "TIERKV_IO_THREADS": "2"}
    c = StoreConfig.from_env(env)
    assert (c.pin_host, c.flush_on_close, c.verify_reads, c.io_threads) == (True, False, False, 2)


# -- TIERKV_CONFIG and TIERKV_LOG_LEVEL ----------------------------------------------------


def test_tierkv_config_file_is_read_first_and_variables_override_it(tmp_path: Path) -> None:
    p = tmp_path / "tierkv.yaml"
    p.write_text("host_bytes: 8MiB\ndisk_bytes: 1GiB\nverify_reads: off\n")
    c = StoreConfig.from_env({"TIERKV_CONFIG": str(p), "TIERKV_DISK_BYTES": "2GiB"},
                             base={"device_bytes": 5, "host_bytes": 7})
    assert (c.device_bytes, c.host_bytes, c.disk_bytes, c.verify_reads) == (5, 8 << 20, 2 << 30, False)


def test_tierkv_config_json_file(tmp_path: Path) -> None:
    p = tmp_path / "tierkv.json"
    p.write_text(json.dumps({"device": "cpu", "io_threads": 3}))
    c = StoreConfig.from_env({"TIERKV_CONFIG": str(p)})
    assert (c.device, c.io_threads) == ("cpu", 3)


def test_empty_tierkv_config_is_unset() -> None:
    assert StoreConfig.from_env({"TIERKV_CONFIG": "  "}) == StoreConfig()


def test_missing_tierkv_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^cannot read config file {tmp_path / 'nope.yaml'}: .* \(named by TIERKV_CONFIG\)$"):
        StoreConfig.from_env({"TIERKV_CONFIG": str(tmp_path / "nope.yaml")})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"^config file .*bad\.json is not valid json: .* \(named by TIERKV_CONFIG\)$"):
        StoreConfig.from_env({"TIERKV_CONFIG": str(tmp_path / "bad.json")})


def test_unknown_field_in_tierkv_config_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"hots_bytes": 1}))
    message = rf"config file {p} \(named by TIERKV_CONFIG\): unknown config field\(s\) \['hots_bytes'\]; known fields are "
    with pytest.raises(ConfigError, match=message):
        StoreConfig.from_env({"TIERKV_CONFIG": str(p)})


def test_bad_value_in_tierkv_config_names_the_field_and_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("host_bytes: lots\n")
    with pytest.raises(ConfigError, match=rf"^host_bytes: expected a size .* \(in config file {p}, named by TIERKV_CONFIG\)$"):
        StoreConfig.from_env({"TIERKV_CONFIG": str(p)})
    with pytest.raises(ConfigError, match=r"^host_bytes: expected a size .*'plenty'$"):  # the variable's value is at fault
        StoreConfig.from_env({"TIERKV_CONFIG": str(p), "TIERKV_HOST_BYTES": "plenty"})
    assert StoreConfig.from_env({"TIERKV_CONFIG": str(p), "TIERKV_HOST_BYTES": "1MiB"}).host_bytes == 1 << 20


@pytest.fixture
def tierkv_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("tierkv")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


@pytest.mark.parametrize(("word", "level"), [("debug", logging.DEBUG), ("INFO", logging.INFO), (" Warning ", logging.WARNING),
                                             ("error", logging.ERROR), ("critical", logging.CRITICAL)])
def test_tierkv_log_level_sets_the_tierkv_logger(tierkv_logger: logging.Logger, word: str, level: int) -> None:
    assert StoreConfig.from_env({"TIERKV_LOG_LEVEL": word}) == StoreConfig()
    assert tierkv_logger.level == level


def test_tierkv_log_level_unset_leaves_logging_alone(tierkv_logger: logging.Logger) -> None:
    tierkv_logger.setLevel(logging.ERROR)
    StoreConfig.from_env({"TIERKV_LOG_LEVEL": ""})
    StoreConfig.from_env({})
    assert tierkv_logger.level == logging.ERROR


def test_tierkv_log_level_adds_one_stderr_handler_only_where_none_exists(tierkv_logger: logging.Logger,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    tierkv_logger.handlers[:] = []
    for _ in range(2):
        StoreConfig.from_env({"TIERKV_LOG_LEVEL": "debug"})
    assert len(tierkv_logger.handlers) == 1
    tierkv_logger.handlers[:] = []
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    StoreConfig.from_env({"TIERKV_LOG_LEVEL": "debug"})
    assert tierkv_logger.handlers == [], "the application's root handler shows tierkv's records already"


@pytest.mark.parametrize("word", ["verbose", "10", "warn"])
def test_bad_tierkv_log_level_is_named(tierkv_logger: logging.Logger, word: str) -> None:
    message = r"^TIERKV_LOG_LEVEL: expected one of \['debug', 'info', 'warning', 'error', 'critical'\], got "
    with pytest.raises(ConfigError, match=message):
        StoreConfig.from_env({"TIERKV_LOG_LEVEL": word})
