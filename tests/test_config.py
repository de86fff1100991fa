import pytest

import zipvl_compile
from zipvl_compile import ZipVLConfig


def test_defaults_follow_the_paper():
    c = ZipVLConfig()
    assert (c.tau, c.recent_probes, c.random_probes, c.keep_recent) == (0.975, 64, 64, 64)
    assert c.ratio is None and c.sparse_queries is True and not c.keeps_everything


@pytest.mark.parametrize("field,value", [
    ("tau", 0.0), ("tau", 1.01), ("tau", "high"), ("recent_probes", -1), ("random_probes", 1.5),
    ("recent_probes", True), ("keep_recent", 0), ("min_keep", 0), ("ratio", 0.0),
    ("ratio", 1.5), ("sparse_queries", 1), ("seed", -3), ("kernel", "triton"),
    ("min_tokens", -1), ("stop_after", "attention"), ("dense_layers", -1), ("dense_layers", 0.5),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ZipVLConfig(**{field: value})


def test_probes_cannot_all_be_zero():
    with pytest.raises(ValueError, match="recent_probes \\+ random_probes"):
        ZipVLConfig(recent_probes=0, random_probes=0)


def test_keep_everything_modes():
    assert ZipVLConfig(tau=1.0).keeps_everything
    assert ZipVLConfig(ratio=1.0).keeps_everything
    assert not ZipVLConfig(tau=1.0, ratio=0.5).keeps_everything


def test_backend_factory_validates_and_applies_fields():
    assert zipvl_compile.backend(tau=0.9).config.tau == 0.9
    base = ZipVLConfig(seed=3)
    assert zipvl_compile.backend(base, ratio=0.5).config == base.replace(ratio=0.5)
    with pytest.raises(ValueError, match="tau"):
        zipvl_compile.backend(tau=2.0)


def test_entry_point_resolves_the_name():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("zipvl") is zipvl_compile.zipvl_backend


@pytest.mark.parametrize("field,value", [
    ("high_bits", 3), ("high_bits", 0), ("low_bits", 1), ("low_bits", True), ("group_size", 0),
    ("residual_length", -1), ("group_size", 2.0),
])
def test_invalid_cache_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ZipVLConfig(**{field: value})


def test_low_bits_cannot_exceed_high_bits():
    with pytest.raises(ValueError, match="low_bits must be <= high_bits"):
        ZipVLConfig(high_bits=4, low_bits=8)
    assert ZipVLConfig(high_bits=16, low_bits=0).low_bits == 0


def test_cache_fields_do_not_reach_the_prefill_settings():
    settings = ZipVLConfig(high_bits=8).prefill_settings()
    assert "high_bits" not in settings and settings["tau"] == 0.975
