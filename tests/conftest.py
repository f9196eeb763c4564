"""Shared test setup: fp32 matmuls everywhere, random inputs with a fixed seed per test."""

import os
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests build the same tiny models again and again: reuse compiled executables across
# tests and runs (the cache is keyed by the computation, so a change recompiles).
jax.config.update("jax_compilation_cache_dir", os.environ.get("GAMMA_MOD_JAX_TEST_JIT_CACHE",
                                                              "/tmp/gamma_mod_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def rel_err(a, b) -> float:
    """‖a - b‖ / ‖b‖ in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_cli(main, argv, capsys):
    """(exit code, stdout, stderr) of a launcher's main(argv) (arguments may be paths)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def rng(request):
    """A numpy Generator with a fixed seed per test (from its id, so a failing run replays),
    printed on failure. GAMMA_MOD_JAX_TEST_SEED=<seed> sets it; GAMMA_MOD_JAX_TEST_SEED=random
    draws a fresh one per test (the seed printed replays it)."""
    chosen = os.environ.get("GAMMA_MOD_JAX_TEST_SEED", "")
    if chosen == "random":
        seed = int.from_bytes(os.urandom(4), "little")
    elif chosen:
        seed = int(chosen)
    else:
        seed = zlib.crc32(request.node.nodeid.encode())
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)
