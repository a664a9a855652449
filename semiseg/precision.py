"""`train.precision=auto`: bfloat16 where the hardware runs it natively, else float32.

    python -m semiseg.precision          # what auto picks on this machine, and why

bfloat16 halves the bytes every convolution moves and, on hardware with bfloat16 arithmetic, runs
the matmuls at up to twice the float32 rate: the yardstick's Mean Teacher step at 128x128 ran
1.42x faster under mixed_bfloat16 on a CPU with AVX512_BF16 (bench/README.md). On a CPU without
it TF emulates bfloat16 and the same step ran 6x slower, so auto must not pick it there. Native:

- CPU: the `avx512_bf16` or `amx_bf16` flag in /proc/cpuinfo (Linux; elsewhere no flags are read
  and auto stays float32);
- GPU: compute capability >= 8.0 (Ampere and later) on every visible GPU.

float16 is never picked by auto (it needs loss scaling and can overflow): only when asked.
`choose` is a pure function of the request and the hardware facts, so it is tested on given flags;
`resolve` reads this machine's. config.yaml keeps what the user asked ("auto"); run_info.json
records the resolved precision and the reason.
"""
from __future__ import annotations

from pathlib import Path

AUTO = "auto"
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_BF16_GPU_CAPABILITY = (8, 0)


def choose(requested: str, cpu_flags=(), gpu_capabilities=()) -> tuple[str, str]:
    """(Keras dtype policy, why) for `requested` (float32 | mixed_float16 | mixed_bfloat16 | auto) on a
    machine with these CPU flags and GPU compute capabilities ((major, minor) per visible GPU)."""
    if requested != AUTO:
        return requested, f"train.precision={requested} as asked"
    if gpu_capabilities:
        caps = [tuple(int(v) for v in c) for c in gpu_capabilities]
        shown = ", ".join(f"{a}.{b}" for a, b in caps)
        if all(c >= MIN_BF16_GPU_CAPABILITY for c in caps):
            return "mixed_bfloat16", f"auto: GPU compute capability {shown} >= 8.0 runs bfloat16 natively"
        return "float32", (f"auto: GPU compute capability {shown}: not all >= 8.0, no native bfloat16 "
                           f"(mixed_float16 only when asked)")
    native = [f for f in NATIVE_BF16_CPU_FLAGS if f in set(cpu_flags)]
    if native:
        return "mixed_bfloat16", f"auto: CPU has {' and '.join(native)} (native bfloat16)"
    return "float32", (f"auto: CPU without {' or '.join(NATIVE_BF16_CPU_FLAGS)}: bfloat16 would be emulated "
                       f"(several times slower than float32)")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo; empty where there is none."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of every GPU TensorFlow sees (TF is loaded here, not at import)."""
    import tensorflow as tf
    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        cap = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if cap:
            caps.append(tuple(cap))
    return caps


def agree_across_workers(requested: str, policy: str, why: str, any_worker_true) -> tuple[str, str]:
    """auto on a job of several workers (nodes): bfloat16 only if every worker runs it natively.

    Each worker resolves auto from its own hardware; on a partition of mixed CPU generations (or
    GPUs of different capability) the workers would otherwise train in different precisions, their
    replicas computing the same step with different round-off, and run_info.json would record the
    chief's choice only. `any_worker_true(flag)` is a collective (distribute.any_worker_true): every
    worker calls this at the same point, with the same `requested` (one config)."""
    if requested != AUTO:
        return policy, why
    if any_worker_true(policy != "mixed_bfloat16") and policy == "mixed_bfloat16":
        return "float32", f"auto: another worker of this job has no native bfloat16 ({why} here); float32 on every worker"
    return policy, why


def resolve(requested: str) -> tuple[str, str]:
    """`choose` with this machine's CPU flags and GPUs (the hardware is read only for auto)."""
    if requested != AUTO:
        return choose(requested)
    return choose(requested, cpu_flags(), gpu_capabilities())


if __name__ == "__main__":
    policy, why = resolve(AUTO)
    print(f"train.precision=auto -> {policy} ({why})")
