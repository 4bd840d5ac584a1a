"""Benchmark plumbing shared by bench/*.py: full-size synthetic inputs, contenders in subprocesses,
wall time and peak memory from /proc (RssAnon = private memory; RssFile = page-cache pages of
memory-mapped inputs, reported separately), and the I/O floor."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GIB = 1024 ** 3


def make_inputs(folder, n, arch="sd1", scale=1, log=print) -> list:
    """Base + n seeded 'fine-tunes' (fp16), generated key by key; reused when already there."""
    from astolfo_merge.features.demo import write_synthetic
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n + 1):
        name = f"{arch}-s{scale}-{'base' if i == 0 else f'ft{i}'}.safetensors"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            t = time.time()
            write_synthetic(path, arch, scale, variant=None if i == 0 else i)
            log(f"  generated {name} ({os.path.getsize(path) / GIB:.2f} GiB) in {time.time() - t:.0f} s")
        paths.append(path)
    return paths


def _status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon", "RssFile", "VmRSS")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _tree(pid) -> list:
    """pid and all its descendants (worker processes count toward a contender's memory)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _tree_status(pid) -> dict:
    """_status summed over the process tree at one instant."""
    total = {}
    for p in _tree(pid):
        for k, v in _status(p).items():
            total[k] = total.get(k, 0) + v
    return total


def run_measured(cmd, env=None, timeout=3600, discard_stdout=False) -> dict:
    """Run a command; return wall seconds, peak RssAnon / RssFile / VmRSS (bytes, summed over the
    command and its child processes at each sample), exit code, output tail."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if discard_stdout else subprocess.PIPE,
                            stderr=subprocess.STDOUT if not discard_stdout else subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, text=True, errors="replace")
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    import threading
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
    reader.start()
    while proc.poll() is None:
        for k, v in _tree_status(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout:
            proc.kill()
    wall = time.monotonic() - t0
    reader.join(5)
    return {"wall": wall, "rc": proc.returncode, **{f"peak_{k}": v for k, v in peak.items()}, "tail": "".join(out)[-2000:]}


def median_run(run, repeats: int) -> dict:
    """`run()` (a run_measured result) `repeats` times: the run of median wall time, with every
    run's wall time in "walls" and the largest peak of each memory figure (the machines are noisy:
    compare medians taken in one run)."""
    runs = [run() for _ in range(max(1, repeats))]
    ok = [r for r in runs if r.get("rc", 0) == 0] or runs
    median = dict(sorted(ok, key=lambda r: r["wall"])[(len(ok) - 1) // 2])
    median["walls"] = [round(r["wall"], 2) for r in runs]
    for key in [k for k in median if k.startswith("peak_")]:
        median[key] = max(r[key] for r in ok)
    return median


def drop_page_cache_hint(paths):
    """Cold-cache runs need root: posix_fadvise DONTNEED on the inputs (best effort)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except OSError:
            pass


def warm(paths):
    subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)


def io_floor(paths, out_bytes, folder) -> dict:
    """Reading the inputs once (cat) plus writing and fsyncing one output-sized file."""
    read = run_measured(["cat", *paths], discard_stdout=True)
    t0 = time.monotonic()
    target = os.path.join(folder, "io-floor.tmp")
    block = b"\0" * (16 << 20)
    with open(target, "wb") as f:
        left = out_bytes
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    write = time.monotonic() - t0
    os.unlink(target)
    return {"read": read["wall"], "write": write, "floor": read["wall"] + write}


def table(rows, columns):
    widths = [max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(columns, widths))]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(lines)


# (reference, contender) pairs whose ratios the scripts print: worker processes against one, Ray
# against worker processes, the peers against ours.
PAIRS = (("ours", "ours2w"), ("ours", "oursauto"), ("ours", "ourscuda"), ("ours32", "ourscuda32"), ("ours2w", "oursray"), ("ours32", "ours2w32"),
         ("ours32", "oursauto32"), ("ours2w32", "oursray32"), ("ours", "mecha"), ("ours", "naive"))


def print_ratios(results, suffix, label):
    """Time and peak private memory (all of a contender's processes) of each pair in PAIRS that ran;
    `results` is keyed contender + suffix."""
    for one, two in PAIRS:
        a, b = results.get(one + suffix), results.get(two + suffix)
        if a and b:
            print(f"{label}: {two}/{one} time {b['wall'] / a['wall']:.2f}x, "
                  f"RssAnon (all processes) {b['peak_RssAnon'] / max(1, a['peak_RssAnon']):.2f}x", flush=True)


def same_bytes(results, suffix, label):
    """Whether every contender of ours that ran (1 / N workers, Ray, fp64 and fp32 apart) wrote the
    same bytes: each prints the sha256 of its output."""
    for fp32 in (False, True):
        shas = {}
        for key, r in results.items():
            who = key[:-len(suffix)]
            found = re.search(r"sha256 ([0-9a-f]{64})", r.get("tail", ""))
            if key.endswith(suffix) and who.startswith("ours") and who.endswith("32") == fp32 and found:
                shas[who] = found.group(1)
        if len(shas) > 1:
            verdict = "same bytes" if len(set(shas.values())) == 1 else f"DIFFERENT bytes: {shas}"
            print(f"{label}: {', '.join(shas)}: {verdict}", flush=True)


def gib(v):
    return f"{v / GIB:.2f}"


def save_results(name, data):
    folder = os.path.join(ROOT, "bench", "results")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2)
