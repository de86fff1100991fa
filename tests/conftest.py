import importlib.util
import os
import sys
from pathlib import Path

# A persistent Inductor cache outside the checkout: cold compiles on 2 cores are 3-4x slower.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "zipvl-compile", "inductor"))

import pytest
import torch

import zipvl_compile

sys.path.insert(0, os.path.dirname(__file__))


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def planted_qkv(B=2, H=4, Hkv=2, n=200, d=16, important=None, strength=4.0, seed=0,
                device="cpu", dtype=torch.float32):
    """Random q, k, v where the positions in ``important`` (default: a sink at 0, every 3rd
    token in the first half, and a local window at the end) attract attention strongly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, d, generator=g)
    k = torch.randn(B, Hkv, n, d, generator=g)
    v = torch.randn(B, Hkv, n, d, generator=g)
    if important is None:
        important = [0] + list(range(3, n // 2, 3)) + list(range(n - 8, n))
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    q = q + strength * u
    k[:, :, important] += strength * u
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)), important


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: Dynamo's per-code-object recompile limit would otherwise
    send later compilations of the same ``forward`` to eager (dense) execution silently."""
    torch._dynamo.reset()
    zipvl_compile.reset_stats()
    yield


@pytest.fixture
def qkv():
    return planted_qkv()[0]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def recording(backend):
    """(a torch.compile backend that runs ``backend`` and keeps each graph it rewrote, the list
    of those graphs)."""
    graphs = []

    def spy(gm, example_inputs, **kw):
        out = backend(gm, example_inputs, **kw)
        graphs.append(gm)
        return out
    return spy, graphs
