"""Measuring code shared by the CPU memory benchmarks of ``run.py`` and ``trl_baseline.py``.

* :class:`SmapsSampler`: the peak memory of a job in this process, sampled from ``/proc``;
* :func:`random_checkpoint`: a random-init model saved once (bf16 safetensors, with the demo
  tokenizer) and reused, so that every job loads its models from disk the way a real run does.

This module must not import lightning (or lit_rlhf beyond ``lit_rlhf.models``):
``trl_baseline.py``'s job processes import it, and a lightning import would be in their memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

# Part of every checkpoint's hash: bump it when the way checkpoints are built changes.
CHECKPOINT_FORMAT = 1


def _read_kb(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    """The ``kB`` values of ``fields`` (e.g. ``"Pss:"``) in a ``/proc`` file; missing ones are absent."""
    found = {}
    with open(path) as f:
        for line in f:
            parts = line.split()  # "Pss:  1234 kB" (smaps_rollup), "RssAnon:\t1234 kB" (status)
            if parts and parts[0] in fields:
                found[parts[0]] = int(parts[1])
                if len(found) == len(fields):
                    break
    return found


class SmapsSampler:
    """Peak memory of this process while the ``with`` block runs, sampled by a daemon thread.

    Figures (``figures``, in MiB = kB / 1024):

    * ``peak_pss_mb``: the proportional set size (``Pss:`` of ``/proc/self/smaps_rollup``).
      File-backed pages (a memory-mapped safetensors checkpoint, shared libraries) count once,
      split among the processes that map them, however many models in this process map the
      same file; ``VmRSS`` counts them again for every mapping. This is the figure to compare:
      what the job adds to the machine;
    * ``peak_rss_anon_mb``: ``RssAnon:`` of ``/proc/self/status``, anonymous memory (tensors,
      the Python heap): what cannot be dropped under pressure and re-read from a file;
    * ``peak_rss_mb``: ``VmHWM:`` of ``/proc/self/status`` read on leaving the block, the
      kernel's exact resident-set high-water mark for the whole process (``ru_maxrss``).

    ``/proc/self/status`` is cheap (~0.1 ms) and is read every ``interval_s``. ``smaps_rollup``
    is not: the kernel walks every page table entry, ~25 ms per GB resident (measured here), so
    at 10 GB a reading takes ~0.25 s, and reading it back to back costs one of the job's cores
    and stalls its mmap/munmap (a loop of matmuls and large allocations ran 3x slower in a
    3 GB process). So it is read at most ``pss_duty`` of the time (after a reading of d
    seconds, the next starts d / pss_duty after it), and between readings the PSS is
    estimated from the status fields: ``RssAnon`` (a process that has not forked shares no
    anonymous page, so its anonymous PSS is its RssAnon) plus the file and shmem PSS of the
    last reading, moved by the change in ``RssFile + RssShmem`` since then (clamped to
    [0, RssFile + RssShmem]). ``peak_pss_mb`` is the largest of the readings and the
    estimates; ``peak_pss_read_mb`` the largest reading alone. RssAnon has no kernel-kept
    peak either: a spike shorter than ``interval_s`` can be missed.

    One reading of both is taken on entering and one on leaving, so that a job shorter than
    the interval still has a peak. :meth:`phase` names what runs next (e.g. ``"load"``,
    ``"step 1"``); :attr:`phases` then holds each phase's peaks, to tell the loading peak
    from the step peak.
    """

    def __init__(self, interval_s: float = 0.01, pss_duty: float = 0.05) -> None:
        self.interval_s, self.pss_duty = interval_s, pss_duty
        self.samples = self.pss_samples = 0
        self.peak_pss_kb = self.peak_pss_read_kb = self.peak_rss_anon_kb = 0
        self.vmhwm_kb, self.cpu_s = 0, 0.0
        self.phases: dict[str, dict[str, float]] = {}
        self._phase: str | None = None
        self._file_pss_kb = self._file_rss_kb = 0  # of the last smaps_rollup reading
        self._next_rollup = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, rollup: bool | None = None) -> None:
        """One reading of ``status``, and of ``smaps_rollup`` if ``rollup`` (None: if it is due)."""
        with self._lock:  # the thread and the caller (phase, enter, exit) both sample
            now, read = time.perf_counter(), 0
            if rollup or (rollup is None and now >= self._next_rollup):
                status = _read_kb("/proc/self/status", ("RssFile:", "RssShmem:"))
                smaps = _read_kb("/proc/self/smaps_rollup", ("Pss:", "Pss_Anon:"))
                read = smaps.get("Pss:", 0)
                self._file_pss_kb = read - smaps.get("Pss_Anon:", 0)
                self._file_rss_kb = status.get("RssFile:", 0) + status.get("RssShmem:", 0)
                self.peak_pss_read_kb = max(self.peak_pss_read_kb, read)
                self.pss_samples += 1
                self._next_rollup = now + (time.perf_counter() - now) / self.pss_duty
            status = _read_kb("/proc/self/status", ("RssAnon:", "RssFile:", "RssShmem:"))
            anon = status.get("RssAnon:", 0)
            file_rss = status.get("RssFile:", 0) + status.get("RssShmem:", 0)
            file_pss = min(max(self._file_pss_kb + file_rss - self._file_rss_kb, 0), file_rss)
            pss = max(anon + file_pss, read)
            self.samples += 1
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_rss_anon_kb = max(self.peak_rss_anon_kb, anon)
            if self._phase is not None:
                peaks = self.phases[self._phase]
                peaks["peak_pss_mb"] = max(peaks["peak_pss_mb"], pss / 1024)
                peaks["peak_rss_anon_mb"] = max(peaks["peak_rss_anon_mb"], anon / 1024)

    def phase(self, name: str) -> None:
        """Close the running phase (a last reading) and start ``name`` (a first reading)."""
        self.sample(rollup=False)
        with self._lock:
            self._phase = name
            self.phases.setdefault(name, {"peak_pss_mb": 0.0, "peak_rss_anon_mb": 0.0})
        self.sample(rollup=False)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
        self.cpu_s = time.thread_time()  # what sampling took from the job's cores

    def __enter__(self) -> SmapsSampler:
        self.sample(rollup=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="SmapsSampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(rollup=True)
        self.vmhwm_kb = _read_kb("/proc/self/status", ("VmHWM:",)).get("VmHWM:", 0)

    @property
    def figures(self) -> dict:
        """``peak_pss_mb``, ``peak_rss_anon_mb``, ``peak_rss_mb`` (VmHWM) in MiB, and
        ``peak_pss_read_mb``, ``samples`` (status readings), ``pss_samples`` (smaps_rollup readings)
        and ``sampler_cpu_s`` (the sampling thread's CPU time)."""
        return {"peak_pss_mb": self.peak_pss_kb / 1024, "peak_rss_anon_mb": self.peak_rss_anon_kb / 1024,
                "peak_rss_mb": self.vmhwm_kb / 1024, "peak_pss_read_mb": self.peak_pss_read_kb / 1024,
                "samples": self.samples, "pss_samples": self.pss_samples, "sampler_cpu_s": self.cpu_s}


def bench_cache() -> Path:
    """Where random checkpoints are kept: ``$LIT_RLHF_BENCH_CACHE``, else ``~/.cache/lit_rlhf/bench``
    (outside the repository: a 1.1B checkpoint is 2.2 GB)."""
    return Path(os.environ.get("LIT_RLHF_BENCH_CACHE") or Path.home() / ".cache" / "lit_rlhf" / "bench").expanduser()


def _checkpoint_dir(arch: dict, directory: Path, task: str, dtype: torch.dtype, seed: int) -> Path:
    key = json.dumps({"arch": arch, "task": task, "dtype": str(dtype), "seed": seed, "format": CHECKPOINT_FORMAT},
                     sort_keys=True)
    return Path(directory) / f"{arch['model_type']}-{task}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def random_checkpoint(arch: dict, directory: Path, task: str = "causal_lm", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0, *, in_subprocess: bool = False) -> Path:
    """A random-init model of ``arch`` saved under ``directory``, built on the first call only.

    ``arch`` holds config fields and ``model_type`` (``run.py``'s ``_llama(...)``); the special
    token ids come from the demo tokenizer (``lit_rlhf.models.load_tokenizer("demo")``, as
    lit_rlhf's ModelConfig does), which is saved beside the weights. ``task`` is ``"causal_lm"``
    or ``"seq_cls"`` (a sequence classifier with one label, the reward and value models'
    shape, with ``pad_token_id`` set so that the score is read at the last real token). The
    weights are one bf16 safetensors file (the model is built in ``dtype`` directly, so a 1.1B
    model needs 2.2 GB to build, not the 4.4 GB of an fp32 init); the directory is named by a
    hash of (arch, task, dtype, seed), written to a temporary directory beside it and renamed
    into place, so a half-written checkpoint is never reused.

    The model's vocabulary may be larger than the tokenizer's (32,000 against the demo's 2,048):
    benchmarks draw prompt ids below ``len(tokenizer)``.

    ``in_subprocess=True`` builds it in a fresh Python process, so that the caller's own peak
    resident set (VmHWM, which no later reading can lower) does not include the full model
    that building holds in memory.
    """
    path = _checkpoint_dir(arch, directory, task, dtype, seed)
    if (path / "config.json").exists():
        return path
    if in_subprocess:
        spec = json.dumps({"arch": arch, "directory": str(directory), "task": task,
                           "dtype": str(dtype).removeprefix("torch."), "seed": seed})
        subprocess.run([sys.executable, __file__, spec], check=True)
        if not (path / "config.json").exists():
            raise RuntimeError(f"building the checkpoint in a subprocess left nothing at {path}")
        return path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lit_rlhf.models import load_tokenizer

    tokenizer = load_tokenizer("demo")
    fields = {k: v for k, v in arch.items() if k != "model_type"}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    if task == "seq_cls":
        fields["num_labels"] = 1  # `from_config(..., num_labels=1)` is refused by transformers 5
    elif task != "causal_lm":
        raise ValueError(f"task must be 'causal_lm' or 'seq_cls', not {task!r}")
    config = AutoConfig.for_model(arch["model_type"], **fields)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=dtype)
    if next(model.parameters()).dtype != dtype:
        raise RuntimeError(f"built the model in {next(model.parameters()).dtype}, not {dtype}")

    Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".{path.name}-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the renamed checkpoint
        model.save_pretrained(tmp)  # transformers 5: safetensors only, one shard up to 50 GB
        tokenizer.save_pretrained(tmp)
        (tmp / "random_checkpoint.json").write_text(
            json.dumps({"arch": arch, "task": task, "dtype": str(dtype), "seed": seed,
                        "format": CHECKPOINT_FORMAT}, indent=2))
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "config.json").exists():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":  # random_checkpoint(..., in_subprocess=True)
    spec = json.loads(sys.argv[1])
    random_checkpoint(spec["arch"], Path(spec["directory"]), spec["task"], getattr(torch, spec["dtype"]), spec["seed"])
