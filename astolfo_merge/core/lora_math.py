"""LoRA / LyCORIS modules: what a file holds per module, and the rows of its weight delta.

Every algorithm gives a delta ΔW of the module's weight, viewed as a 2-D matrix
[out rows, in·kh·kw columns] (row-major flatten of the conv kernel, so it reshapes straight into
the LDM tensor), times a scale `alpha / rank` (1 when the file has no alpha or no rank; alpha = 0 gives 0, as in the WebUI):

* LoRA / LoCon (kohya `lora_up` [out, r(,1,1)], `lora_down` [r, in(,kh,kw)]): ΔW = up @ down;
  with a Tucker core `lora_mid` [r, r, kh, kw] (down/up 1x1): ΔW[p, q, k, l] = Σ mid[i,j,k,l] down[j,q] up[p,i].
* LoHa (`hada_w1_a` [out, r], `hada_w1_b` [r, in·kh·kw], same for w2): ΔW = (w1a @ w1b) ⊙ (w2a @ w2b);
  with Tucker cores `hada_t1/t2` [r, r, kh, kw] (w?a [r, out], w?b [r, in]): each factor is
  einsum("ijkl,jr,ip->prkl", t, wb, wa). rank = w1b rows.
* LoKr (`lokr_w1` or `lokr_w1_a @ lokr_w1_b` [o1, i1]; `lokr_w2` or `lokr_w2_a @ lokr_w2_b` or the Tucker
  form with `lokr_t2` [o2, i2(,kh,kw)]): ΔW = kron(w1, w2). rank = the inner dim of the factorised
  factor (w2's first, then w1's, as the WebUI and ComfyUI read it); none (scale 1) when both are whole.
* full (`diff` / `diff_b`, norm layers `w_norm` / `b_norm`): ΔW is stored as is (scale 1).

Rows are computed on demand (`weight_rows(start, stop)`) so a delta never needs to exist whole:
LoRA rows use up[start:stop], LoHa rows w?a rows, LoKr row r = kron row (r // o2, r % o2), full rows are
read from the file. Factors are small (rank × dim) and are loaded per key in the compute dtype.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from ..io.reader import CheckpointReader

ALGORITHMS = {  # tensor suffix -> algorithm
    "lora_up.weight": "lora", "lora_down.weight": "lora", "lora_mid.weight": "lora",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha", "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "diff": "full", "diff_b": "full", "w_norm": "full", "b_norm": "full",
}
SHARED = ("alpha",)
UNSUPPORTED = {  # suffix -> what it is (refused: baking it without its own rule would be wrong)
    "dora_scale": "DoRA weight decomposition", "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "OFT",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "lora_A.weight": "diffusers / PEFT LoRA", "lora_B.weight": "diffusers / PEFT LoRA",
}
TITLES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "full diff"}
ROW_BLOCK_ELEMENTS = 1 << 20        # rows are produced in blocks of at most ~8 MB of fp64


@dataclass
class Module:
    """One trained module of a LoRA file: its tensors (suffix -> stored key) and their shapes.
    Derived properties are cached: build `keys` / `shapes` completely before reading them."""
    name: str
    keys: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)

    @functools.cached_property
    def algorithm(self) -> str:
        algos = {ALGORITHMS[s] for s in self.keys if s in ALGORITHMS}
        return algos.pop() if len(algos) == 1 else ("mixed" if algos else "none")

    @functools.cached_property
    def has_weight(self) -> bool:
        return any(s in self.keys for s in ALGORITHMS if s not in ("diff_b", "b_norm"))

    @functools.cached_property
    def bias_key(self) -> str | None:
        return self.keys.get("diff_b") or self.keys.get("b_norm")

    def shape(self, suffix):
        return tuple(self.shapes[suffix])

    def _lokr_factor_shape(self, n) -> tuple:
        if f"lokr_w{n}" in self.keys:
            s = self.shape(f"lokr_w{n}")
            return s[0], s[1:]
        a, b = self.shape(f"lokr_w{n}_a"), self.shape(f"lokr_w{n}_b")
        if n == 2 and "lokr_t2" in self.keys:
            return a[1], (b[1],) + self.shape("lokr_t2")[2:]
        return a[0], b[1:]

    @functools.cached_property
    def delta_shape(self) -> tuple | None:
        """The weight delta's natural shape (out, in, *kernel) or (out, in·kernel) when flattened; None without
        weight or when factors are missing (`check` names those)."""
        try:
            return self._delta_shape()
        except (KeyError, IndexError):
            return None

    def _delta_shape(self):
        algo = self.algorithm
        if algo == "lora":
            up, down = self.shape("lora_up.weight"), self.shape("lora_down.weight")
            kernel = self.shape("lora_mid.weight")[2:] if "lora_mid.weight" in self.keys else down[2:]
            return (up[0], down[1]) + tuple(kernel)
        if algo == "loha":
            if "hada_t1" in self.keys:
                return (self.shape("hada_w1_a")[1], self.shape("hada_w1_b")[1]) + self.shape("hada_t1")[2:]
            return (self.shape("hada_w1_a")[0],) + self.shape("hada_w1_b")[1:]
        if algo == "lokr":
            o1, i1 = self._lokr_factor_shape(1)
            o2, i2 = self._lokr_factor_shape(2)
            return (o1 * o2, math.prod(i1) * math.prod(i2))
        if algo == "full":
            key = "diff" if "diff" in self.keys else "w_norm" if "w_norm" in self.keys else None
            return self.shape(key) if key else None
        return None

    @functools.cached_property
    def rank(self) -> int | None:
        try:
            return self._rank()
        except (KeyError, IndexError):
            return None

    def _rank(self):
        algo = self.algorithm
        if algo == "lora":
            return self.shape("lora_down.weight")[0]
        if algo == "loha":
            return self.shape("hada_w1_b")[0]
        if algo == "lokr":   # as the WebUI and ComfyUI read it: w2's inner dim wins over w1's
            for n in (2, 1):
                if f"lokr_w{n}_b" in self.keys:
                    return self.shape(f"lokr_w{n}_b")[0]
        return None

    @functools.cached_property
    def is_conv(self) -> bool:
        shape = self.delta_shape
        return bool(shape) and len(shape) == 4 and shape[2:] != (1, 1)

    def check(self, path):
        """Refuse incomplete or inconsistent factor sets (names the module)."""
        self._check_shapes(path)
        algo = self.algorithm
        need = {"lora": [("lora_up.weight", "lora_down.weight")],
                "loha": [("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")],
                "lokr": [("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")], "full": []}.get(algo)
        if need is None:
            raise CheckpointError(path, f"module '{self.name}' mixes or lacks LoRA factor tensors ({', '.join(sorted(self.keys))})")
        if need and not any(all(s in self.keys for s in group) for group in need):
            raise CheckpointError(path, f"module '{self.name}' is an incomplete {TITLES[algo]}: has {', '.join(sorted(self.keys))}")
        if algo == "lokr":
            if not ("lokr_w2" in self.keys or {"lokr_w2_a", "lokr_w2_b"} <= set(self.keys)):
                raise CheckpointError(path, f"module '{self.name}' is an incomplete LoKr: no lokr_w2 / lokr_w2_a+b")
            for n in (1, 2):
                if f"lokr_w{n}" not in self.keys:
                    a, b = self.shape(f"lokr_w{n}_a"), self.shape(f"lokr_w{n}_b")
                    if (a[0] if n == 2 and "lokr_t2" in self.keys else a[-1]) != b[0]:
                        raise CheckpointError(path, f"module '{self.name}': lokr_w{n}_a {list(a)} and lokr_w{n}_b {list(b)} do not chain")
        if algo == "lora":
            up, down = self.shape("lora_up.weight"), self.shape("lora_down.weight")
            inner = self.shape("lora_mid.weight")[:2] if "lora_mid.weight" in self.keys else (down[0], down[0])
            if up[1] != inner[0] or down[0] != inner[1] or (len(up) == 4 and up[2:] != (1, 1)):
                raise CheckpointError(path, f"module '{self.name}': lora_up {list(up)} and lora_down {list(down)} do not chain")
        if algo == "loha":
            tucker = "hada_t1" in self.keys
            for n in (1, 2):
                a, b = self.shape(f"hada_w{n}_a"), self.shape(f"hada_w{n}_b")
                if (a[0] if tucker else a[1]) != b[0]:
                    raise CheckpointError(path, f"module '{self.name}': hada_w{n}_a {list(a)} and hada_w{n}_b {list(b)} do not chain")
            if self.shape("hada_w1_b")[1:] != self.shape("hada_w2_b")[1:]:
                raise CheckpointError(path, f"module '{self.name}': hada_w1 and hada_w2 have different shapes")


    def _check_shapes(self, path):
        """Each factor has the dimensions its algorithm indexes and none of them is empty: a rank-0
        LoRA (alpha / 0) or a 1-D lora_up would otherwise fail in the middle of the bake."""
        for suffix, shape in self.shapes.items():
            if suffix in SHARED:
                continue
            key, need = self.keys[suffix], MIN_DIMS.get(suffix, 2)
            if len(shape) < need:
                raise CheckpointError(path, f"module '{self.name}': tensor '{key}' has shape {list(shape)}; "
                                            f"a {suffix} factor needs at least {need} dimensions")
            if 0 in shape:
                what = "rank 0" if suffix in RANK_DIM and shape[RANK_DIM[suffix]] == 0 else "an empty dimension"
                raise CheckpointError(path, f"module '{self.name}': tensor '{key}' has shape {list(shape)} ({what}): "
                                            "it changes nothing and cannot be scaled by alpha / rank")


MIN_DIMS = {"diff": 1, "diff_b": 1, "w_norm": 1, "b_norm": 1}   # every other factor is at least a matrix
RANK_DIM = {"lora_down.weight": 0, "lora_up.weight": 1, "hada_w1_b": 0, "hada_w2_b": 0, "hada_w1_a": 1, "hada_w2_a": 1,
            "lokr_w1_b": 0, "lokr_w2_b": 0, "lokr_w1_a": 1, "lokr_w2_a": 1}


def group_modules(shapes: dict) -> tuple:
    """Split a LoRA file's keys into modules. Returns (modules by name, unsupported [(key, why)], alone keys)."""
    modules, unsupported, stray = {}, [], []
    for key, shape in shapes.items():
        name, _, suffix = key.partition(".")
        foreign = next((why for s, why in UNSUPPORTED.items() if key.endswith("." + s)), None)
        if foreign:
            unsupported.append((key, foreign))
        elif suffix in ALGORITHMS or suffix in SHARED:
            mod = modules.setdefault(name, Module(name))
            mod.keys[suffix], mod.shapes[suffix] = key, tuple(shape)
        else:
            stray.append(key)
    return modules, unsupported, stray


# ---------------------------------------------------------------------------------------------
# Delta rows

def load_factors(module: Module, reader, dtype, device) -> dict:
    """The module's small tensors in the compute dtype (full `diff` tensors stay in the file)."""
    out = {}
    for suffix, key in module.keys.items():
        if suffix in ("diff", "w_norm", "diff_b", "b_norm"):
            continue
        out[suffix] = reader.read(key).to(device=device, dtype=dtype)
    return out


def scale_of(module: Module, factors: dict) -> float:
    """alpha / rank (1 when the file stores no alpha, or the algorithm has no rank)."""
    alpha, rank = factors.get("alpha"), module.rank
    if alpha is None or rank is None or alpha.numel() != 1:
        return 1.0
    value = float(alpha.reshape(()).item())
    return value / rank if math.isfinite(value) else 1.0


def _tucker_rows(core, wb, wa_cols):
    """einsum("ijkl,jr,ip->prkl") with wa restricted to the wanted output columns; -> [n, in·kh·kw]."""
    rebuilt = torch.einsum("ij...,jr,ip->pr...", core, wb.reshape(wb.shape[0], -1), wa_cols)
    return rebuilt.reshape(rebuilt.shape[0], -1)


def _lokr_factor(factors, n):
    if f"lokr_w{n}" in factors:
        w = factors[f"lokr_w{n}"]
        return w.reshape(w.shape[0], -1)
    a, b = factors[f"lokr_w{n}_a"], factors[f"lokr_w{n}_b"]
    if n == 2 and "lokr_t2" in factors:
        return _tucker_rows(factors["lokr_t2"], b, a)
    return a @ b.reshape(b.shape[0], -1)


def weight_rows(module: Module, factors: dict, start: int, stop: int, reader, dtype, device) -> torch.Tensor:
    """Rows [start, stop) of the unscaled 2-D weight delta [stop-start, in·kh·kw]."""
    algo = module.algorithm
    if algo == "lora":
        up = factors["lora_up.weight"]
        up = up.reshape(up.shape[0], -1)[start:stop]
        down = factors["lora_down.weight"]
        if "lora_mid.weight" in factors:
            return _tucker_rows(factors["lora_mid.weight"], down, up.T)
        return up @ down.reshape(down.shape[0], -1)
    if algo == "loha":
        if "hada_t1" in factors:
            one = _tucker_rows(factors["hada_t1"], factors["hada_w1_b"], factors["hada_w1_a"][:, start:stop])
            two = _tucker_rows(factors["hada_t2"], factors["hada_w2_b"], factors["hada_w2_a"][:, start:stop])
            return one * two
        w1b, w2b = factors["hada_w1_b"], factors["hada_w2_b"]
        return (factors["hada_w1_a"][start:stop] @ w1b.reshape(w1b.shape[0], -1)) * \
               (factors["hada_w2_a"][start:stop] @ w2b.reshape(w2b.shape[0], -1))
    if algo == "lokr":
        cache = factors.setdefault("_lokr", {})
        if "w1" not in cache:
            cache["w1"], cache["w2"] = _lokr_factor(factors, 1), _lokr_factor(factors, 2)
        w1, w2 = cache["w1"], cache["w2"]
        rows = torch.arange(start, stop, device=w1.device)
        o2 = w2.shape[0]
        return torch.einsum("nb,nd->nbd", w1[rows // o2], w2[rows % o2]).reshape(stop - start, -1)
    key = module.keys.get("diff") or module.keys.get("w_norm")
    return reader.read_rows(key, start, stop).to(device=device, dtype=dtype).reshape(stop - start, -1)


def bias_rows(module: Module, start: int, stop: int, reader, dtype, device) -> torch.Tensor:
    return reader.read_rows(module.bias_key, start, stop).to(device=device, dtype=dtype).reshape(stop - start)


# ---------------------------------------------------------------------------------------------
# Adding a LoRA's rows to chunks of the keys it changes

class LoraBake:
    """Adds one LoRA's delta rows to chunks of the keys it touches (lazily, factors cached per key)."""

    def __init__(self, lora, targets: dict):
        """`lora`: a lora.LoraFile; `targets`: module name -> lora_names.Target of the modules to bake."""
        self.lora = lora
        self.by_key = {}        # LDM key -> [(module, target, is_bias)]
        for name, target in targets.items():
            module = lora.modules[name]
            if module.has_weight:
                self.by_key.setdefault(target.weight, []).append((module, target, False))
            if module.bias_key:
                self.by_key.setdefault(target.bias, []).append((module, target, True))
        self._lock = threading.Lock()
        self._cached = (None, None)

    def _factors(self, key, dtype, device) -> dict:
        tag = (key, dtype, str(device))
        if self._cached[0] != tag:
            with CheckpointReader(self.lora.path, self.lora.header) as reader:
                loaded = {m.name: load_factors(m, reader, dtype, device) for m, _t, _b in self.by_key[key]}
            self._cached = (tag, loaded)
        return self._cached[1]

    def adder(self, key: str, key_shape: tuple, multiplier: float):
        """post/pre hook: chunk (rows [start, stop) of `key`, compute dtype) -> chunk + multiplier·delta."""
        contributions = self.by_key[key]

        def add(chunk, start, stop):
            with self._lock:
                return self._add(key, key_shape, contributions, multiplier, chunk, start, stop)
        return add

    def _add(self, key, key_shape, contributions, multiplier, chunk, start, stop):
        n = stop - start
        flat = chunk.reshape(n, -1)
        factors = self._factors(key, chunk.dtype, chunk.device)
        with CheckpointReader(self.lora.path, self.lora.header) as reader:
            for module, target, is_bias in contributions:
                mf = factors[module.name]
                weight = multiplier * (1.0 if is_bias else scale_of(module, mf))
                if target.transpose:
                    if "_transposed" not in mf:
                        rows = module.delta_shape[0]
                        mf["_transposed"] = weight_rows(module, mf, 0, rows, reader, chunk.dtype, chunk.device).T.contiguous()
                    flat.add_(mf["_transposed"][start:stop], alpha=weight)
                    continue
                first, count = target.rows(key_shape)
                lo, hi = max(start, first), min(stop, first + count)
                step = max(1, ROW_BLOCK_ELEMENTS // max(1, flat.shape[1]))
                for a in range(lo, hi, step):
                    b = min(hi, a + step)
                    if is_bias:
                        delta = bias_rows(module, a - first, b - first, reader, chunk.dtype, chunk.device).reshape(b - a, 1)
                    else:
                        delta = weight_rows(module, mf, a - first, b - first, reader, chunk.dtype, chunk.device)
                    flat[a - start:b - start].add_(delta, alpha=weight)
        return flat.reshape(chunk.shape)
