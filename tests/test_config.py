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
    ("min_tokens", -1),
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
