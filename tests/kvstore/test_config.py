import pytest

from kvstore.config import StoreConfig, load_config
from kvstore.errors import ConfigError
from kvstore.units import format_size, parse_duration, parse_size


def test_units():
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("256 KiB") == 256 << 10
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(123) == 123
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2min") == 120
    assert format_size(4 << 20) == "4.0MiB"


def test_file_plus_overrides(tmp_path):
    f = tmp_path / "kv.toml"
    f.write_text('[store]\ndram = "64MiB"\ndisk_dir = "/tmp/x"\ndisk = "1GiB"\n')
    c = load_config(f, {"store.dram": "128MiB"})
    assert c.store.dram == 128 << 20 and c.store.disk == 1 << 30
    assert str(c.store.disk_dir) == "/tmp/x"


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"store.dram": "lots"}, "store.dram"),
        ({"store.dramm": "1GiB"}, "store.dramm"),
        ({"store.low_watermark": 0.99}, "watermark"),
        ({"store.alignment": 1000}, "store.alignment"),
        ({"store.pin_memory": "maybe"}, "store.pin_memory"),
        ({"store.dram": 0}, "store.dram"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[store\n")
    with pytest.raises(ConfigError):
        load_config(bad)


def test_config_is_frozen():
    c = StoreConfig(dram="1MiB")
    with pytest.raises(AttributeError):
        c.dram = 5  # type: ignore[misc]


def test_section_shape_errors_name_the_key():
    with pytest.raises(ConfigError, match="store must be a table"):
        load_config(overrides={"store": 5})
    with pytest.raises(ConfigError, match="store.dram"):
        load_config(overrides={"store.dram": {"nested": 1}})
