"""A decode or verify step's layer on the CPU in two C calls (`kernels/step.c`), int8 weights.

A decode step on a laptop- or server-class CPU is bound by reading the weights (~0.1 GB of int8 layers), yet the eager
torch layer spends as long again on ~60 small operations and their Python calls, and its batched
attention products run at a third of the memory speed. The C layer does the same arithmetic as
`engine.model.Block` over `engine.quant`'s int8 weights with fp32 activations: input norm, fused
q|k|v product, QK-norm, RoPE (one call); attention over the cache's segments, o_proj, norms,
residuals, fused gate|up and down products (the other). The caller's cache writes the new keys
and values between the two. Rows of a step are independent (see step.c), so a verify step of T
tokens equals T decode steps bit for bit. Over a scratch area (`ScratchStep`) one call runs every
layer, writing the keys and values itself: the same two halves, without returning to Python.

The reference is the torch layer itself (tests compare the two over dequantised weights). The
library is compiled on first use with the host's C compiler (`cc -O3 -march=native -fopenmp`, about
a second) into the cache folder, keyed by the source and the CPU; without a compiler (or with
GHOSTLINE_NATIVE=0) `available()` is False and the model runs its torch layers. The folder is this
user's, 0700 (one owned by someone else or writable by others is refused for a fresh private temp
folder), and each library's SHA-256 is recorded beside it when it is built: a library that does not
match its record is rebuilt, never loaded.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("ghostline.kernels")

SOURCE = Path(__file__).with_name("step.c")
SOURCES = (SOURCE, Path(__file__).with_name("prefill_attention.c"))  # one library
HEADERS = (Path(__file__).with_name("simd.h"),)
MAX_ROWS = 16  # new tokens a step serves; past this (prefill) torch's matrix-matrix products win


def gemv_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 x [M, K] @ (q [N, K] int8 * scale [N])^T -> [M, N], in float64 for the tests' oracle."""
    return (x.double() @ q.double().T) * scale.double()


_lib = None
_tried = False
_fallback: Path | None = None  # this process's private build folder, where the cache folder was refused


def _cache_dir() -> Path:
    base = os.environ.get("GHOSTLINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ghostline")
    return Path(base) / "kernels"


def _build_dir() -> Path:
    """Where libraries are built and loaded from: the kernel cache folder, made 0700, if it is this
    user's and nobody else may write to it (anyone who can plant a file there runs code in every
    Ghostline process); else a fresh private temp folder for this process, said in the log."""
    global _fallback
    path = _cache_dir()
    why = _unsafe(path)
    if why is None:
        return path
    if _fallback is None:
        _fallback = Path(tempfile.mkdtemp(prefix="ghostline-kernels-"))
        atexit.register(shutil.rmtree, _fallback, True)
    log.warning("kernel cache %s %s: not using it; building the CPU step kernel in %s", path, why, _fallback)
    return _fallback


def _unsafe(path: Path) -> str | None:
    """Why `path` is no private folder of this user's (created 0700 if missing, tightened to 0700 if
    only readable by others), or None."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        return f"cannot be created ({exc})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}"
    if st.st_mode & 0o022:
        return "is writable by group or others"
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return None


def _record(lib: Path) -> Path:
    """The file holding `lib`'s SHA-256, written when it was built."""
    return lib.with_name(lib.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _matches_record(lib: Path) -> bool:
    """`lib` is what this user built: both are this user's plain files, the record is 0600, and the
    library's SHA-256 equals it."""
    mine = os.getuid()
    try:
        rec, st = _record(lib).lstat(), lib.lstat()
        if not (stat.S_ISREG(rec.st_mode) and stat.S_ISREG(st.st_mode)):
            return False
        if rec.st_uid != mine or st.st_uid != mine or rec.st_mode & 0o077:
            return False
        return _record(lib).read_text().strip() == _sha256(lib)
    except OSError:
        return False


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _compile() -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256(b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS)) + _cpu_key().encode() + cc.encode()).hexdigest()[:16]
    out = _build_dir() / f"step-{key}.so"
    if out.exists() or out.is_symlink():
        if _matches_record(out):
            return out
        log.warning("CPU step kernel %s does not match a SHA-256 this user recorded when building it: rebuilding it", out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so, record = Path(tmp) / out.name, Path(tmp) / _record(out).name
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *map(str, SOURCES), "-o", str(so)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("CPU step kernel not built (%s): %s", " ".join(cmd), done.stderr.strip()[-500:])
            return None
        with os.fdopen(os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(_sha256(so) + "\n")
        os.replace(so, out)  # atomic: another process building the same key finds a whole file
        os.replace(record, _record(out))
    return out


def _load():
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("GHOSTLINE_NATIVE", "1") == "0":
            return None
        try:
            path = _compile()
            if path is not None:
                lib = ctypes.CDLL(str(path))
                lib.ghostline_gemv_int8.restype = None
                lib.ghostline_gemv_int8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
                lib.ghostline_lanes.restype = ctypes.c_int
                lib.ghostline_qkv.restype = None
                lib.ghostline_qkv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 6
                lib.ghostline_attn_mlp.restype = None
                lib.ghostline_attn_mlp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
                lib.ghostline_scratch_step.restype = None
                lib.ghostline_scratch_step.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
                                                       + [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_void_p])
                lib.ghostline_scratch_kv.restype = None
                lib.ghostline_scratch_kv.argtypes = ([ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
                                                     + [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_void_p])
                lib.ghostline_shift.restype = None
                lib.ghostline_shift.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 7 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
                lib.ghostline_prefill_bf16.restype = ctypes.c_int
                lib.ghostline_prefill_attention.restype = None
                lib.ghostline_prefill_attention.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_long] * 8
                                                            + [ctypes.c_void_p, ctypes.c_long, ctypes.c_float]
                                                            + [ctypes.c_void_p] * 2 + [ctypes.c_int])
                _lib = lib
        except OSError as e:
            log.warning("CPU step kernel not loaded: %s", e)
    return _lib


def available() -> bool:
    """Whether the compiled kernel can run here (it is built on the first call)."""
    return _load() is not None


def lanes() -> int:
    """The vector width the kernel was built for: K must be a multiple of it."""
    lib = _load()
    return lib.ghostline_lanes() if lib is not None else 0


def shift(k: torch.Tensor, v: torch.Tensor, src: int, end: int, dst: int, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """PIE's splice in one C pass: rows src..end of k/v [L, KV, cap, hd] move to dst, keys turned by
    cos/sin [L, hd] (the bits of `kernels.rope_shift.rope_shift_cpu`). False, having done nothing,
    where it cannot serve (not built, not contiguous fp32 on the CPU)."""
    lib = _load()
    if (lib is None or k.device.type != "cpu" or k.dtype != torch.float32 or v.dtype != k.dtype
            or k.shape != v.shape or not (k.is_contiguous() and v.is_contiguous())):
        return False
    L, KV, cap, hd = k.shape
    n = end - src
    if n <= 0:
        return True
    if src < 0 or dst < 0 or max(src, dst) + n > cap:
        raise ValueError(f"cannot move rows {src}..{end} to {dst} in a cache of {cap} rows")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    lib.ghostline_shift(k.data_ptr(), v.data_ptr(), L * KV, KV, cap, hd, src, n, dst, cos.data_ptr(), sin.data_ptr(),
                        torch.get_num_threads())
    return True


def serves_gemv(x: torch.Tensor) -> bool:
    """Whether `gemv_int8` can take activations x [M, K] (built, CPU, K a multiple of the lanes)."""
    lib = _load()
    return lib is not None and x.device.type == "cpu" and x.shape[-1] % lib.ghostline_lanes() == 0


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (fp32, CPU) @ (q [N, K] int8 * scale [N] fp32)^T -> [..., N] fp32, at most MAX_ROWS rows."""
    lib = _load()
    K, N = x.shape[-1], q.shape[0]
    flat = x.reshape(-1, K)
    M = flat.shape[0]
    if lib is None or M > MAX_ROWS or K % lib.ghostline_lanes() or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"gemv_int8 cannot serve x {tuple(x.shape)} {x.dtype} (M <= {MAX_ROWS}, fp32, K % lanes)")
    flat = flat.contiguous()
    if not (q.is_contiguous() and scale.is_contiguous() and q.dtype == torch.int8 and scale.dtype == torch.float32):
        raise ValueError("gemv_int8 needs contiguous int8 rows and fp32 scales")
    y = torch.empty(M, N, dtype=torch.float32) if out is None else out
    lib.ghostline_gemv_int8(flat.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K,
                            torch.get_num_threads())
    return y.view(*x.shape[:-1], N)


class _Layer(ctypes.Structure):
    """Mirrors `Layer` in step.c (field order matters)."""

    _fields_ = ([(n, ctypes.c_long) for n in ("D", "H", "KV", "hd", "F", "window", "gemma")]
                + [(n, ctypes.c_float) for n in ("eps", "scale", "softcap")]
                + [(n, ctypes.c_void_p) for n in ("qkv", "o", "gu", "down", "qkv_s", "o_s", "gu_s", "down_s", "qkv_b",
                                                  "n_in", "n_post_attn", "n_pre_ff", "n_post_ff", "n_q", "n_k")]
                + [("threads", ctypes.c_int)])


MAX_SEGMENTS = 6  # step.c's NSEG


class _Segments(ctypes.Structure):
    _fields_ = [("count", ctypes.c_long), ("K", ctypes.c_void_p * MAX_SEGMENTS), ("V", ctypes.c_void_p * MAX_SEGMENTS),
                ("n", ctypes.c_long * MAX_SEGMENTS), ("start", ctypes.c_long * MAX_SEGMENTS),
                ("stride", ctypes.c_long * MAX_SEGMENTS)]


def _qkv_work(shape: tuple, T: int) -> int:
    """Floats of scratch `ghostline_qkv` needs for T rows."""
    D, H, KV, hd, _ = shape
    return T * (D + (H + 2 * KV) * hd)


def _attn_mlp_work(shape: tuple, T: int, keys: int) -> int:
    """Floats of scratch `ghostline_attn_mlp` needs for T rows over `keys` cache rows (2: step.c's SPLIT)."""
    D, H, KV, hd, F = shape
    G = H // KV
    return T * (H * hd + 2 * D + 3 * F + keys * G + 2 * G * hd)


class FusedLayer:
    """One layer's weights laid out for the C step. Matrices are int8 rows [N, K] with fp32 scales
    [N]: `qkv` stacks q, k, v rows, `gu` gate and up rows; norms are fp32 weights with Gemma's +1
    offset already added. `norms` keys: in, post_attn, pre_ff, post_ff, q, k (Gemma) or in,
    post_attn (Llama)."""

    def __init__(self, *, dim: int, heads: int, kv_heads: int, head_dim: int, hidden: int, window: int | None,
                 gemma: bool, eps: float, scale: float, softcap: float | None, qkv, o, gu, down,
                 qkv_bias: torch.Tensor | None, norms: dict[str, torch.Tensor]):
        if heads % kv_heads or heads // kv_heads > 16:
            raise ValueError(f"{heads} query heads over {kv_heads} kv heads: the C step serves up to 16 per kv head")
        self.shape = (dim, heads, kv_heads, head_dim, hidden)
        self._keep = [t for pair in (qkv, o, gu, down) for t in pair] + list(norms.values())
        if qkv_bias is not None:
            self._keep.append(qkv_bias)
        for t in self._keep:
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("FusedLayer needs contiguous CPU tensors")
        ptr = lambda name: norms[name].data_ptr() if name in norms else None  # noqa: E731
        self.layer = _Layer(D=dim, H=heads, KV=kv_heads, hd=head_dim, F=hidden, window=window or 0, gemma=int(gemma),
                            eps=eps, scale=scale, softcap=softcap or 0.0,
                            qkv=qkv[0].data_ptr(), o=o[0].data_ptr(), gu=gu[0].data_ptr(), down=down[0].data_ptr(),
                            qkv_s=qkv[1].data_ptr(), o_s=o[1].data_ptr(), gu_s=gu[1].data_ptr(),
                            down_s=down[1].data_ptr(), qkv_b=None if qkv_bias is None else qkv_bias.data_ptr(),
                            n_in=ptr("in"), n_post_attn=ptr("post_attn"), n_pre_ff=ptr("pre_ff"),
                            n_post_ff=ptr("post_ff"), n_q=ptr("q"), n_k=ptr("k"), threads=1)
        self._ref = ctypes.byref(self.layer)

    def serves(self, x: torch.Tensor) -> bool:
        """A step the C layer can run: batch 1, at most MAX_ROWS new tokens, fp32 on the CPU."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1 and x.shape[1] <= MAX_ROWS
                and _load() is not None)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [1, T, D], RoPE tables [T, hd] -> q [T, H, hd], k and v [1, KV, T, hd] (normed, rotated)."""
        _, H, KV, hd, _ = self.shape
        T = x.shape[1]
        x = x.contiguous()
        q = torch.empty(T, H, hd)
        k = torch.empty(1, KV, T, hd)
        v = torch.empty(1, KV, T, hd)
        work = torch.empty(_qkv_work(self.shape, T))
        self.layer.threads = torch.get_num_threads()
        _lib.ghostline_qkv(self._ref, x.data_ptr(), T, cos.contiguous().data_ptr(), sin.contiguous().data_ptr(),
                           q.data_ptr(), k.data_ptr(), v.data_ptr(), work.data_ptr())
        return q, k, v

    def attn_mlp(self, x: torch.Tensor, q: torch.Tensor, pos: torch.Tensor, segments) -> torch.Tensor:
        """x [1, T, D] + attention of q [T, H, hd] at host positions pos [T] over `segments` (a cache's
        `update` answer: (K, V [1, KV, S, hd], position of row 0) each) + the MLP -> new x [1, T, D]."""
        hd = self.shape[3]
        T = x.shape[1]
        if len(segments) > MAX_SEGMENTS:
            raise ValueError(f"at most {MAX_SEGMENTS} cache segments, got {len(segments)}")
        seg, keys = _Segments(count=len(segments)), 0
        for i, (K, V, start) in enumerate(segments):
            if K.shape[0] != 1 or K.stride(-1) != 1 or K.stride(-2) != hd or V.stride() != K.stride():
                raise ValueError(f"segment {i} has batch {K.shape[0]} or strides {K.stride()} the C step cannot read")
            seg.K[i], seg.V[i] = K.data_ptr(), V.data_ptr()
            seg.n[i], seg.start[i], seg.stride[i] = K.shape[2], start, K.stride(1)
            keys += K.shape[2]
        out = x.contiguous().clone()
        pos = pos.to(torch.long).contiguous()
        work = torch.empty(_attn_mlp_work(self.shape, T, keys))
        self.layer.threads = torch.get_num_threads()
        _lib.ghostline_attn_mlp(self._ref, out.data_ptr(), T, q.data_ptr(), pos.data_ptr(), ctypes.byref(seg),
                                work.data_ptr(), keys)
        return out


class _Planes(ctypes.Structure):
    """Mirrors `Planes` in step.c."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("pk", "pv", "sk", "sv")]
                + [(n, ctypes.c_long) for n in ("p_layer", "p_head", "s_layer", "s_head", "start")])


def _tables(tables: list) -> tuple[list, ctypes.Array, ctypes.Array]:
    """Layers' (cos, sin) [T, hd] -> contiguous copies (keep them until the C call returns) and the
    arrays of their pointers step.c takes."""
    tables = [(c.contiguous(), s.contiguous()) for c, s in tables]
    cos = (ctypes.c_void_p * len(tables))(*(c.data_ptr() for c, _ in tables))
    sin = (ctypes.c_void_p * len(tables))(*(s.data_ptr() for _, s in tables))
    return tables, cos, sin


class ScratchStep:
    """Every layer of a decode or verify step over a scratch area (engine.cache.ScratchCache, batch 1)
    in one C call: the same numbers as the per-layer FusedLayer calls, without ~60 returns to Python
    a step (their tensors, ctypes calls and cache bookkeeping cost about as much as the layers'
    arithmetic on a 2-core AMD EPYC)."""

    def __init__(self, layers: list[FusedLayer]):
        self.fused = layers  # they hold the weights the structs point into
        self.layers = (_Layer * len(layers))(*(f.layer for f in layers))  # copies of the structs
        shapes = {f.shape for f in layers}
        if len(shapes) != 1:
            raise ValueError("a scratch step needs every layer of the same shape")
        self.shape = shapes.pop()

    def serves(self, x: torch.Tensor, cache) -> bool:
        """A batch-1 step of at most MAX_ROWS tokens over a ScratchCache (fp32, CPU)."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1 and x.shape[1] <= MAX_ROWS
                and hasattr(cache, "claim") and cache.k.shape[1] == 1 and cache.k.dtype == torch.float32
                and getattr(cache.prefix, "one_plane", True)  # no context blocks or holes in the prefix
                and cache.k.device.type == "cpu" and cache.prefix.k.dtype == torch.float32 and _load() is not None)

    def _span(self, layers: range | None) -> tuple[int, int]:
        first, stop = (0, len(self.fused)) if layers is None else (layers.start, layers.stop)
        if not 0 <= first < stop <= len(self.fused) or (layers is not None and layers.step != 1):
            raise ValueError(f"layers {layers} are not a run of this model's {len(self.fused)}")
        return first, stop

    def _planes(self, cache, first: int) -> _Planes:
        """The cache's planes from layer `first` on, for step.c."""
        hd = self.shape[3]
        pk, sk = cache.prefix.k, cache.k
        for t in (pk, cache.prefix.v, sk, cache.v):
            if t.stride(-1) != 1 or t.stride(-2) != hd:
                raise ValueError(f"cache planes with strides {t.stride()} the C step cannot read")
        p, s = first * pk.stride(0) * pk.element_size(), first * sk.stride(0) * sk.element_size()
        return _Planes(pk=pk.data_ptr() + p, pv=cache.prefix.v.data_ptr() + p, sk=sk.data_ptr() + s,
                       sv=cache.v.data_ptr() + s, p_layer=pk.stride(0), p_head=pk.stride(1), s_layer=sk.stride(0),
                       s_head=sk.stride(2), start=cache.start)

    def _threads(self) -> None:
        threads = torch.get_num_threads()
        if self.layers[0].threads != threads:
            for layer in self.layers:
                layer.threads = threads

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, tables: list, cache, *,
                 layers: range | None = None) -> torch.Tensor:
        """x [1, T, D] at host positions pos [T] (consecutive), `tables[l]` layer l's (cos, sin) [T, hd]
        -> the hidden state after the last of `layers` (default: all) [1, T, D]; the keys and values
        land in the scratch."""
        _, H, KV, hd, _ = self.shape
        first, stop = self._span(layers)
        T = x.shape[1]
        planes = self._planes(cache, first)
        i = cache.claim(int(pos[0]), T)
        tables, cos, sin = _tables(tables[first:stop])  # tables held until the call returns
        q_kv = T * (H + 2 * KV) * hd  # q, k, v of a layer (step.c keeps them ahead of the halves' work)
        work = torch.empty(q_kv + max(_qkv_work(self.shape, T), _attn_mlp_work(self.shape, T, cache.start + i + T)))
        self._threads()
        out = x.contiguous().clone()
        pos = pos.to(torch.long).contiguous()
        _lib.ghostline_scratch_step(ctypes.addressof(self.layers) + first * ctypes.sizeof(_Layer), stop - first,
                                    out.data_ptr(), T, cos, sin, pos.data_ptr(), ctypes.byref(planes), i,
                                    work.data_ptr())
        return out

    def copy_state(self, x: torch.Tensor, pos: torch.Tensor, tables: list, cache, *, layers: range) -> None:
        """SEC's state copying in one C call: the keys and values of `layers` for x [1, T, D] at pos
        [T] (each layer's input norm, k|v rows, K-norm, RoPE) into the scratch; see
        `Transformer.copy_state`."""
        D, _, KV, hd, _ = self.shape
        first, stop = self._span(layers)
        T = x.shape[1]
        planes = self._planes(cache, first)
        i = cache.claim(int(pos[0]), T)
        tables, cos, sin = _tables(tables[first:stop])
        work = torch.empty(T * (D + 2 * KV * hd))
        self._threads()
        x = x.contiguous()
        _lib.ghostline_scratch_kv(ctypes.addressof(self.layers) + first * ctypes.sizeof(_Layer), stop - first,
                                  x.data_ptr(), T, cos, sin, ctypes.byref(planes), i, work.data_ptr())


def prefill_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, start: int, lo: int, hi: int,
                      qpos: torch.Tensor, *, scale: float, window: int | None) -> torch.Tensor | None:
    """Causal (optionally windowed) attention of q [1, H, T, hd] at increasing host positions qpos
    over rows [lo, hi) of one segment K, V [1, KV, S, hd] (row i at position start + i), with bf16
    products and fp32 sums and softmax (`prefill_attention.c`). None where it cannot serve: not
    built, a CPU without AVX512-BF16, not fp32, or a head size it does not handle."""
    lib = _load()
    B, H, T, hd = q.shape
    KV = K.shape[1]
    if (lib is None or not lib.ghostline_prefill_bf16() or B != 1 or K.shape[0] != 1 or H % KV
            or hd % 32 or hd > 256 or q.dtype != torch.float32 or K.dtype != torch.float32 or V.dtype != K.dtype
            or q.device.type != "cpu" or K.device.type != "cpu" or K.stride() != V.stride()
            or K.stride(-1) != 1 or K.stride(-2) != hd or hi <= lo):
        return None
    qpos = qpos.to(torch.long).contiguous()
    if T > 1 and not bool((qpos[1:] > qpos[:-1]).all()):  # a block's key range assumes increasing positions
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    n16 = -(-(hi - lo) // 16) * 16
    work = torch.empty(2 * KV * n16 * hd, dtype=torch.int16)  # bf16 pairs of keys and values
    lib.ghostline_prefill_attention(q.data_ptr(), K.data_ptr(), V.data_ptr(), K.stride(1), H, KV, T, hd, start, lo, hi,
                                    qpos.data_ptr(), window or 0, scale, out.data_ptr(), work.data_ptr(),
                                    torch.get_num_threads())
    return out
