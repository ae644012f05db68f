"""What a worker's host is using, sent with every heartbeat.

The orchestrator places by the core's own counts; an operator also wants to
see a worker's CPU, memory and GPUs next to them (``/metrics``), and a
placement policy of their own may use them. psutil reads the process and the
host; NVML (the ``pynvml`` module of ``nvidia-ml-py``, the ``gpu`` extra)
reads the GPUs when it is installed and finds a driver, else ``gpus`` is
empty. A sample costs tens of microseconds, once per heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = ["GpuUsage", "ResourceMonitor", "Resources"]

log = logging.getLogger(__name__)
_MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GpuUsage:
    index: int
    name: str
    utilization_pct: float  # busy share of the last sample period (NVML)
    memory_used_mb: float
    memory_total_mb: float


@dataclass(frozen=True, slots=True)
class Resources:
    """One sample. CPU shares are since the previous sample (100 = one full core)."""

    process_cpu_pct: float
    host_cpu_pct: float  # all cores together, 0-100
    process_rss_mb: float
    host_memory_available_mb: float
    host_memory_total_mb: float
    gpus: tuple[GpuUsage, ...] = ()


class ResourceMonitor:
    """Samples this process, its host and (with NVML) its GPUs."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        # The first cpu_percent() calls only set the reference point.
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)
        self._nvml = _open_nvml()

    def sample(self) -> Resources:
        memory = psutil.virtual_memory()
        return Resources(
            process_cpu_pct=self._process.cpu_percent(None),
            host_cpu_pct=psutil.cpu_percent(None),
            process_rss_mb=self._process.memory_info().rss / _MB,
            host_memory_available_mb=memory.available / _MB,
            host_memory_total_mb=memory.total / _MB,
            gpus=self._gpus(),
        )

    def _gpus(self) -> tuple[GpuUsage, ...]:
        nvml = self._nvml
        if nvml is None:
            return ()
        try:
            out = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                out.append(
                    GpuUsage(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        utilization_pct=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        memory_used_mb=memory.used / _MB,
                        memory_total_mb=memory.total / _MB,
                    )
                )
            return tuple(out)
        except nvml.NVMLError as exc:
            log.warning("NVML stopped answering (%s); GPUs no longer reported", exc)
            self.close()
            return ()

    def close(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()


def _open_nvml() -> Any:
    """The initialised ``pynvml`` module, or None (not installed, or no driver)."""
    try:
        import pynvml  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("no GPU to report (NVML: %s)", exc)
        return None
    return pynvml
