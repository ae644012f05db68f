"""The resource sample a worker sends with its heartbeats (haif.runtime.resources)."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from haif import wire
from haif.contracts import WorkerSnapshot
from haif.runtime.messages import Announce
from haif.runtime.resources import GpuUsage, ResourceMonitor, Resources


def _vm_rss_mb() -> float:
    """This process's resident set in MiB, from /proc/self/status (VmRSS, in kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_a_sample_reads_this_process_and_host() -> None:
    monitor = ResourceMonitor()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn CPU: the next sample must see it
        pass
    before = _vm_rss_mb()
    sample = monitor.sample()
    after = _vm_rss_mb()
    assert sample.process_cpu_pct > 10
    assert 0 <= sample.host_cpu_pct <= 100
    # The kernel's own figure, read just before and after (not through psutil):
    # the sample lies between them, up to 2 MiB for what moved in between
    # (a unit slip, 10^6 for 2^20 bytes, is off by 5 %: 10 MiB at 200 MiB).
    assert min(before, after) - 2 <= sample.process_rss_mb <= max(before, after) + 2
    assert 0 < sample.host_memory_available_mb <= sample.host_memory_total_mb
    monitor.close()


class _FakeNvml(types.ModuleType):
    """NVML's calls as pynvml names them (no GPU here to read a real one from)."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__("pynvml")
        self.calls = 0
        self.fail_after = fail_after
        self.shut = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise self.NVMLError("GPU is lost")
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes | str:
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else "NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return types.SimpleNamespace(gpu=37 + handle, memory=0)


def test_gpus_are_read_through_nvml_and_dropped_when_it_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeNvml(fail_after=1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monitor = ResourceMonitor()
    assert monitor.sample().gpus == (
        GpuUsage(0, "NVIDIA H100 80GB HBM3", 37.0, 1024.0, 81920.0),
        GpuUsage(1, "NVIDIA A100-SXM4-80GB", 38.0, 2048.0, 81920.0),
    )
    assert monitor.sample().gpus == ()  # NVML failed: reported once, then no GPUs
    assert fake.shut and monitor.sample().gpus == ()


def test_no_nvml_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert ResourceMonitor().sample().gpus == ()


def test_an_announcement_carries_its_sample_over_the_wire() -> None:
    sample = Resources(12.5, 40.0, 300.0, 1000.0, 2000.0, (GpuUsage(0, "H100", 50.0, 1.0, 2.0),))
    announce = Announce(WorkerSnapshot("w1", "r", "H100-80G"), "http://w1", sample)
    assert wire.decode(wire.encode(announce)) == announce
    bare = Announce(WorkerSnapshot("w1", "r", "H100-80G"), "http://w1")
    assert wire.decode(wire.encode(bare)) == bare
