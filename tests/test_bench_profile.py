"""The GPU benchmark's account of where the GPU waited (bench/gpu_profile.py, host_gaps): the
README's figures rest on it, so it is checked on a timeline whose answer is known."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
MS = 1_000_000  # events count nanoseconds; the timeline below is in milliseconds


def gpu_profile():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_profile", BENCH / "gpu_profile.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


class Event:
    """The part of torch's kineto event that host_gaps reads."""

    def __init__(self, name, device, start, end, correlation=0, thread=1, annotation=False):
        self._name, self._device, self._start, self._end = name, device, start * MS, end * MS
        self._correlation, self._thread, self._annotation = correlation, thread, annotation

    def name(self):
        return self._name

    def device_type(self):
        return f"DeviceType.{self._device}"

    def start_ns(self):
        return self._start

    def end_ns(self):
        return self._end

    def duration_ns(self):
        return self._end - self._start

    def correlation_id(self):
        return self._correlation

    def linked_correlation_id(self):
        return 0

    def start_thread_id(self):
        return self._thread

    def is_user_annotation(self):
        return self._annotation


def test_gaps_the_host_caused_are_put_on_the_operation_that_launched_late():
    events = [
        Event("forward", "CPU", 0, 2000, annotation=True),
        # a product launched in time: the GPU runs it at once
        Event("aten::mm", "CPU", 10, 20), Event("cudaLaunchKernel", "CPU", 12, 14, correlation=1),
        Event("gemm", "CUDA", 15, 100, correlation=1),
        # queued long before it runs, behind a copy: a gap, but not the host's
        Event("aten::add", "CPU", 30, 40), Event("cudaLaunchKernel", "CPU", 32, 33, correlation=2),
        Event("add", "CUDA", 150, 160, correlation=2),
        # the host looks up rows for 280 ms and launches the copy late: the GPU waits for it
        Event("aten::index_select", "CPU", 160, 440), Event("cudaMemcpyAsync", "CPU", 430, 432, correlation=3),
        Event("copy", "CUDA", 440, 460, correlation=3),
        # a read of a GPU value blocks the host; the next launch comes after it
        Event("aten::item", "CPU", 461, 700), Event("cudaStreamSynchronize", "CPU", 462, 699, correlation=4),
        Event("aten::mm", "CPU", 705, 720), Event("cudaLaunchKernel", "CPU", 706, 707, correlation=5),
        Event("gemm", "CUDA", 710, 800, correlation=5),
    ]
    gaps = gpu_profile().host_gaps(events)
    assert gaps["gpu_span_ms"] == 785
    assert gaps["gaps_ms"] == 50 + 280 + 250  # 100->150, 160->440, 460->710
    assert gaps["host_gaps_ms"] == 280 + 250  # not the 50 ms behind the copy
    sites = {(s["label"], s["op"]): s["ms"] for s in gaps["host_gaps_by_site"]}
    assert sites == {("forward", "aten::index_select"): 280, ("forward", "aten::mm"): 250}
    assert gaps["syncs"] == [{"label": "forward", "op": "aten::item", "calls": 1, "ms": 237}]
    assert gpu_profile().host_gaps([e for e in events if e.device_type().endswith("CPU")]) == {}
