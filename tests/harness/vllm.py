"""What the vLLM lane's tests (tests/vllm_lane) share: vLLM's settings, a child's environment."""

from __future__ import annotations

import os

#: vLLM on two CPU cores: no torch.compile warm-up (about 20 s a start; the
#: same kernels otherwise) and a context no longer than the tests need.
VLLM_ARGS: dict[str, str | int | float | bool] = {
    "enforce_eager": True,
    "dtype": "float32",  # bfloat16 is 3-4x slower on a CPU without AVX-512 BF16
    "max_model_len": 1024,
}


def haif_env() -> dict[str, str]:
    """The environment of a ``python -m haif`` or vLLM child: this one, offline, unbuffered."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
