"""The DLPack side of the binding: producers that only speak the pre-1.0 protocol, arrays of other
libraries (results handed back through their array namespace), capsule ownership, and one context per
thread."""

import gc
import sys
import threading

import numpy as np
import pytest

import numerics as N

import tnorm
from tnorm import _lib


class LegacyProducer:
    """A non-NumPy array type with the pre-1.0 protocol only: __dlpack__(stream=None), no max_version."""

    def __init__(self, a):
        self.a = a
        self.exports = 0

    def __dlpack__(self, stream=None):
        assert stream is None, "a host array must be exported without a stream"
        self.exports += 1
        return self.a.__dlpack__()

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class ForwardingProducer:
    """A non-NumPy array type speaking DLPack 1.0 through NumPy's own export (versioned capsules): numpy
    arrays themselves are read through the array interface, so capsules are tested through this."""

    def __init__(self, a, readonly=False):
        self.a = a
        if readonly:
            self.a = a.view()
            self.a.flags.writeable = False

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class NamespacedProducer(LegacyProducer):
    """Like LegacyProducer, with an array namespace: results come back through its asarray."""

    class _Namespace:
        @staticmethod
        def asarray(a):
            return NamespacedProducer(np.asarray(a))

    def __array_namespace__(self, api_version=None):
        return self._Namespace


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_legacy_producer(rng, dtype):
    x_np = N.normal(rng, (5, 40), dtype)
    w_np = N.uniform(rng, (40,), dtype)
    x, w = LegacyProducer(x_np), LegacyProducer(w_np)
    y = tnorm.rms_norm(x, w)
    assert x.exports == 1 and w.exports == 1
    # No namespace to hand the result back through: a NumPy array.
    assert type(y) is np.ndarray
    N.assert_close(y, N.reference("rms_norm", x_np, weight=w_np)[0])


def test_legacy_producer_written_in_place(rng):
    x_np = N.normal(rng, (5, 40), "f32")
    ref = N.reference("l2_norm", x_np, scale=3.0)[0]
    x = LegacyProducer(x_np)
    assert tnorm.l2_norm(x, scale=3.0, out=x) is x
    N.assert_close(x_np, ref)


def test_result_through_array_namespace(rng):
    x_np = N.normal(rng, (3, 16), "f16")
    r_np = N.normal(rng, (3, 16), "f16")
    y, s = tnorm.add_rms_norm(NamespacedProducer(x_np), NamespacedProducer(r_np), None)
    assert isinstance(y, NamespacedProducer) and isinstance(s, NamespacedProducer)
    ref_y, ref_s = N.reference("add_rms_norm", x_np, residual=r_np)
    N.assert_close(y.a, ref_y)
    N.assert_bits_equal(s.a, ref_s, "residual_out")


@pytest.mark.parametrize("producer", [LegacyProducer, ForwardingProducer])
def test_capsules_released(rng, producer):
    """Every capsule is released once the call returns (its deleter drops the producer's reference to
    the array): the arrays' reference counts come back, after good calls and after a refused one."""
    x = N.normal(rng, (4, 32), "f32")
    w = N.uniform(rng, (32,), "f32")
    y = np.empty_like(x)
    before = [sys.getrefcount(a) for a in (x, w, y)]
    px, pw, py = producer(x), producer(w), producer(y)
    for _ in range(100):
        tnorm.rms_norm(px, pw, out=py)
    with pytest.raises(ValueError):
        tnorm.rms_norm(px, producer(w[:7]), out=py)
    del px, pw, py
    gc.collect()
    assert [sys.getrefcount(a) for a in (x, w, y)] == before


def test_versioned_capsules_read(rng):
    """DLPack 1.0 capsules: read, computed on, written; a read-only one is refused as an output and
    left as it was."""
    x = N.normal(rng, (6, 48), "f32")
    w = N.uniform(rng, (48,), "f32")
    y = np.full_like(x, np.nan)
    assert tnorm.rms_norm(ForwardingProducer(x), ForwardingProducer(w), out=ForwardingProducer(y)) is not None
    N.assert_close(y, N.reference("rms_norm", x, weight=w)[0])
    frozen = np.full_like(x, np.nan)
    with pytest.raises(ValueError, match="read-only"):
        tnorm.rms_norm(ForwardingProducer(x), out=ForwardingProducer(frozen, readonly=True))
    assert np.isnan(frozen).all()


def test_bf16_numpy_through_array_interface(rng):
    """NumPy cannot export bfloat16 through DLPack: such arrays are read through the array interface."""
    x = N.normal(rng, (4, 64), "bf16")
    with pytest.raises(BufferError):
        x.__dlpack__()
    N.assert_close(tnorm.l2_norm(x), N.reference("l2_norm", x)[0])


def test_one_context_per_thread(rng):
    """Threads calling at once each get their own context, freed when the thread ends."""
    tnorm.rms_norm(np.ones((1, 4), np.float32))  # this thread's context, so the count below is stable
    base = len(_lib._registry)
    destroyed = []
    library = _lib.lib()
    real_destroy = library.tn_context_destroy

    def counting_destroy(handle):  # the library's own destroy, counted
        destroyed.append(handle)
        real_destroy(handle)
    cases = [(N.normal(rng, (16, 300), "f32"), N.uniform(rng, (300,), "f32")) for _ in range(8)]
    errors = []
    start = threading.Barrier(len(cases))

    def work(x, w):
        try:
            start.wait()
            ref = N.reference("rms_norm", x, weight=w)[0]
            for _ in range(25):
                N.assert_close(tnorm.rms_norm(x, w), ref)
            with pytest.raises(ValueError, match="weight has 299 elements"):
                tnorm.rms_norm(x, w[:299])
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=c) for c in cases]
    library.tn_context_destroy = counting_destroy
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
    finally:
        library.tn_context_destroy = real_destroy
    assert not errors, errors[0]
    assert len(_lib._registry) == base
    assert len(destroyed) == len(cases), f"{len(destroyed)} of {len(cases)} thread contexts destroyed"


def test_library_reports_itself():
    assert tnorm.library_version().count(".") == 2
    assert "libtnorm" in tnorm.library_path()
    assert tnorm.cuda_available() in (True, False)
    if not tnorm.cuda_available():  # the reason is the library's, not an empty one
        assert _lib.lib().tn_device_available(_lib.context(), _lib.TN_DEVICE_CUDA) != 0


def test_jax_arrays_on_the_host(rng):
    """jax arrays are immutable: the result is computed into a NumPy buffer and handed back as a jax array."""
    jax = pytest.importorskip("jax")
    cpu = jax.devices("cpu")[0]
    x_np = N.normal(rng, (6, 200), "bf16")
    w_np = N.uniform(rng, (200,), "f32")
    y = tnorm.rms_norm(jax.device_put(x_np, cpu), jax.device_put(w_np, cpu), weight_offset=1.0)
    assert isinstance(y, jax.Array) and y.dtype == x_np.dtype
    N.assert_close(np.asarray(y), N.reference("rms_norm", x_np, weight=w_np, weight_offset=1.0)[0])
