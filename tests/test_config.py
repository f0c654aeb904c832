"""StoreConfig: one dataclass from a dict, a JSON/YAML file or TIERKV_* variables, validated once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_layout
from tierkv import BlockStore, ConfigError, Namespace, StoreConfig
from tierkv.config import parse_bytes


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


@pytest.mark.parametrize(("value", "expected"), [("yes", True), ("ON", True), ("1", True), ("false", False), ("off", False), (False, False)])
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
    [("bad.json", '{"device_bytes": 1,', "json"), ("bad.yaml", "device_bytes: [1, 2\n", "yaml"), ("bad.conf", "device_bytes=1", "conf")],
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


def test_from_env_ignores_program_variables() -> None:
    c = StoreConfig.from_env({"TIERKV_CONFIG": "/etc/x.yaml", "TIERKV_LOG_LEVEL": "debug", "TIERKVX": "1"})
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
