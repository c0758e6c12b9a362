"""Helpers shared by the benchmark scripts in bench/.

The conventions are those of bench/attention.py: results go to `bench/results/<machine>/`
(`machine_slug`), each configuration can run in a fresh interpreter that prints one JSON line
after `RESULT_TAG` (`launch`), CPU peak memory is the tensor memory one step allocates
(`allocated_peak_mb`, from the profiler) and the growth of VmHWM over one step after a reset
through /proc/self/clear_refs, and a timing sample during which other processes kept cores busy
is set aside and taken again (`timed_samples`). Every report carries the command line, date,
torch and Python versions and the CPU or GPU name (`environment`).
"""

from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "@@result@@"  # marks a worker's JSON line on stdout
MAX_OTHER_LOAD = 0.25  # a sample with more cores than this busy with other processes is retaken


# --- machine -----------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def machine_slug(device: str) -> str:
    """'cpu-amd-epyc-7b13', 'nvidia-h100-80gb-hbm3': the results folder (as bench/attention.py)."""
    name = device_name(device)
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", name, flags=re.I)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if device == "cuda" else f"cpu-{slug}"


def results_dir(device: str, out: Path | None = None) -> Path:
    return Path(out) if out is not None else ROOT / "bench" / "results" / machine_slug(device)


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lora_pass", "bench", "patterns"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+modified" if dirty else "")) or None


def environment(device: str) -> dict:
    """What every report records about how and where it was measured."""
    import torch

    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "commit": _git_commit(),
    }


def environment_lines(env: dict) -> list[str]:
    """Markdown bullet lines for `environment`'s dict."""
    lines = [
        f"* command: `{env['command']}`",
        f"* date: {env['date']}",
        f"* device: {env['device_name']} ({env['device']}, {env['threads']} thread(s) per run, {env['cpu_count']} CPUs)",
        f"* torch {env['torch']}, Python {env['python']}",
    ]
    if env.get("commit"):
        lines.append(f"* source: commit {env['commit']}")
    return lines


# --- memory and load (Linux; other systems get None where /proc is missing) ------------------------


def rss_mb(field: str = "VmRSS") -> float | None:
    """VmRSS / VmHWM of this process in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Make RSS follow live tensors: big blocks are mmap'ed (unmapped on free), the heap trimmed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def max_rss_mb() -> float:
    """Peak resident memory of this process since it started, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def machine_busy(seconds: float = 1.0) -> float:
    """CPU cores kept busy by other processes over `seconds`."""
    b0, s0 = cpu_seconds()
    time.sleep(seconds)
    b1, s1 = cpu_seconds()
    return max(0.0, (b1 - b0) - (s1 - s0)) / seconds


def wait_until_idle(max_wait: float, threshold: float = MAX_OTHER_LOAD) -> float:
    """Wait (at most max_wait s) until other processes use under `threshold` cores; the wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait and machine_busy(0.5) >= threshold:
        pass
    return time.perf_counter() - start


def allocated_peak_mb(step) -> float | None:
    """MiB of tensor memory one call of `step` allocates above what is live before it, on CPU.

    The CPU allocator reports every allocation and free to the profiler with its running total
    (`profile_memory=True`): the largest total during the call, less the total before it, is the
    CPU counterpart of `torch.cuda.max_memory_allocated`, exact to the byte and free of the
    page and heap slack that resident memory carries. None where the profiler gives no events.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - private, present in every supported torch
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []

    def walk(nodes):
        for node in nodes:
            if node.typed[0] == _EventType.Allocation:
                events.append((node.start_time_ns, node.typed[1].alloc_size, node.typed[1].total_allocated))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if not events:
        return None
    events.sort()
    before = events[0][2] - events[0][1]
    return max(total for _, _, total in events) / 2**20 - before / 2**20


def peak_step_memory(step, sync, device: str) -> tuple[float | None, str]:
    """MiB that one more call of `step` needs above what is live before it, and how it was measured."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "torch.cuda.max_memory_allocated"
    release_freed_memory()
    before = rss_mb("VmRSS")
    if before is not None and reset_peak_rss():
        step()
        return rss_mb("VmHWM") - before, "VmHWM growth over one step (reset by clear_refs, mmap threshold 64 KiB)"
    step()
    return None, "not measured (no /proc/self/clear_refs)"


# --- timing ----------------------------------------------------------------------------------------


def timed_samples(fn, repeats: int, sync=lambda: None, *, clock: str = "wall", min_sample_s: float = 0.0,
                  max_other: float = MAX_OTHER_LOAD, retry_budget_s: float | None = None, on_sample=None) -> dict:
    """Median seconds per call over `repeats` samples.

    A sample loops `fn` until `min_sample_s`. With the wall clock, a sample during which other
    processes kept more than `max_other` cores busy is set aside and taken again, while the
    retries cost less than `retry_budget_s` (default: max(30 s, 2 x repeats samples)); if no
    sample was clean the median of the others is returned and `contended` is True. The CPU clock
    (this process's CPU time, meant for one thread: see `launch(threads=1)`) needs no retries:
    time slices given to other processes do not count. `on_sample(seconds, clean)` is called
    after each sample (a progress bar).
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    if clock == "cpu":
        max_other = math.inf
    tick = 1 / os.sysconf("SC_CLK_TCK")
    clean, dirty, other_total, clean_time, retried = [], [], 0.0, 0.0, 0.0
    while len(clean) < repeats and len(dirty) < 10 * max(repeats, 1):
        if retry_budget_s is not None and retried > retry_budget_s:
            break
        busy0, own0 = cpu_seconds()
        calls, start, wall_start = 0, now(), time.perf_counter()
        while True:
            fn()
            calls += 1
            sync()
            elapsed = now() - start
            if elapsed >= min_sample_s:
                break
        wall = time.perf_counter() - wall_start
        busy1, own1 = cpu_seconds()
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        ok = other <= max_other * wall + 2 * tick  # two ticks: /proc/stat resolution
        if ok:
            clean.append(elapsed / calls)
            other_total, clean_time = other_total + other, clean_time + wall
        else:
            dirty.append(elapsed / calls)
            retried += wall
        if on_sample is not None:
            on_sample(elapsed / calls, ok)
        if retry_budget_s is None:
            retry_budget_s = max(30.0, 2 * repeats * elapsed)
    samples = clean or dirty
    return {
        "time_s": statistics.median(samples) if samples else None,
        "samples_s": samples,
        "discarded_samples_s": dirty,
        "other_load": other_total / clean_time if clean else None,
        "contended": not clean,
    }


# --- subprocess workers ----------------------------------------------------------------------------


def worker_main(run_worker, spec_json: str) -> None:
    """Body of `script --worker SPEC`: run it and print the result line (or the error)."""
    import traceback

    try:
        result = run_worker(json.loads(spec_json))
    except Exception as exc:  # reported by the driver, next to the other configurations
        tail = traceback.format_exc().strip().splitlines()[-6:]
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": tail}
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)


def launch(script: Path, spec: dict, *, timeout: float, warm_cache: bool, show_progress: bool = True,
           threads: int | None = None, cache_dir: str | os.PathLike | None = None) -> dict:
    """Run `script --worker SPEC` in a fresh interpreter; its result dict, or {"error": ...}.

    Each worker gets an empty Inductor cache unless `warm_cache`, so compile times are cold;
    `cache_dir` (not with `warm_cache`) gives it that directory as its Inductor cache instead of
    a temporary one, so that a later worker for the same configuration finds what it compiled.
    The worker's stderr (its progress bar) goes to ours when `show_progress`. `threads` sets
    OMP_NUM_THREADS (torch's intra-op threads and Inductor's C++ kernels); the worker should
    also call `torch.set_num_threads`.
    """
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="lora_pass_bench_") as cache:
        cache = str(cache_dir) if cache_dir is not None else cache
        if not warm_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
            env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
        start = time.perf_counter()
        # its own process group: on a timeout (or ^C) the worker's compilers (cc1plus) end with it
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=None if show_progress else subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
        except BaseException:
            _kill_group(proc)
            raise
        proc.stdout, proc.stderr = out, err
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG):]), "wall_s": wall}
    tail = ((proc.stderr or "") + proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "wall_s": wall}


def _kill_group(proc) -> None:
    """End a worker and everything it started (its process group), then reap it."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


# --- output ----------------------------------------------------------------------------------------


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str, allow_nan=True) + "\n")


def fmt(value, digits: int = 1, suffix: str = "") -> str:
    """A table cell: '-' for missing values, fixed digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int) or isinstance(value, str):
        return str(value)
    if value != value:  # NaN
        return "nan"
    return f"{value:.{digits}f}{suffix}"


def fmt_sci(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}e}"
