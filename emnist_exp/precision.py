"""Number formats for training: the `precision` option, what `auto` picks, GPU sharing, float32 models out."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:  # Keras is imported where it is used: config checks a precision without it
    import keras

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
# Tensor cores (Volta, compute capability 7.0) are where mixed_float16 pays: Keras' mixed-precision
# guide, https://keras.io/api/mixed_precision/
TENSOR_CORE_CAPABILITY = (7, 0)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bfloat16 dot products
PAYS = 1.3  # bf16's training speed over float32 that makes it worth another number format
# mixed_bfloat16 over float32 in training images/s: the median over the tuned space's members at
# batch 32 and 64 on the real sample (0.12x to 0.21x; benchmarks/precision.py, BENCHMARKS.md "Mixed
# precision"). Measured on a CPU that reports neither bf16 flag, where bf16 is emulated; no CPU with
# native bf16 has been measured, so `auto` has no evidence that bf16 pays on a CPU and keeps float32.
MEASURED_BF16_SPEEDUP = 0.16


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is absent."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each visible CUDA GPU (none on a CPU-only build or machine)."""
    import tensorflow as tf  # noqa: PLC0415

    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability:
            found.append(tuple(capability))
    return found


def choose(gpus: list[tuple[int, int]], flags: set[str], bf16_speedup: float | None = MEASURED_BF16_SPEEDUP) -> str:
    """What `auto` means on a machine with these GPUs and CPU flags.

    mixed_float16 when every GPU has tensor cores; on a CPU, mixed_bfloat16 only where the CPU has
    native bf16 and bf16 was measured to train at least PAYS times as fast; float32 otherwise.
    """
    if gpus and all(c >= TENSOR_CORE_CAPABILITY for c in gpus):
        return "mixed_float16"
    if not gpus and flags & set(BF16_CPU_FLAGS) and bf16_speedup is not None and bf16_speedup >= PAYS:
        return "mixed_bfloat16"
    return "float32"


def resolve(precision: str) -> str:
    """The Keras dtype policy a `precision` setting stands for on this machine."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return choose(gpu_capabilities(), cpu_flags()) if precision == "auto" else precision


def share_gpus() -> int:
    """Memory growth on every visible GPU, so two workers fit on one; returns the GPUs seen.

    TensorFlow otherwise maps nearly all of a GPU's memory at its first op. Call before any op runs.
    """
    import tensorflow as tf  # noqa: PLC0415

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # this process already initialised it: growth is fixed for its life
            pass
    return len(gpus)


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Layers (and models) made inside take the `name` policy; Keras' global default is restored after."""
    import keras  # noqa: PLC0415
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def float32_copy(trained: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """The trained model rebuilt in float32 with its weights: what leaves a trial, whatever policy trained it.

    Mixed policies keep their variables in float32, so the copy is exact; it serves at float32 speed
    on any CPU, where a bf16 graph is emulated on CPUs without bf16 and float16 is slow everywhere but a GPU.
    """
    if trained.dtype_policy.name == "float32":
        return trained
    with dtype_policy("float32"):
        model = build()
    model.set_weights(trained.get_weights())
    return model
