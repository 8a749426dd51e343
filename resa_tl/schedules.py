"""Tuned kernel schedules: which TileLang config each op uses for a given problem shape.

(One module, over ~450 lines, because the file format, its validation with a clear message per
field, the nearest-shape lookup and the run-time resolution rules describe one artefact.)

A schedule is one JSON file per GPU architecture (``schedules/<arch>.json`` at the repository
root, shipped in the package as ``resa_tl/schedule_data/``), written by ``autotune/run.py``:

    {
      "format": "resa_tl.schedule/1",
      "arch": "sm90",                     # sm80 | sm86 | sm89 | sm90 (TileLang target sm_90a)
      "tuned": true,                      # false: heuristic defaults, only compile-validated
      "provenance": {"gpu": ..., "sm_count": ..., "driver": ..., "cuda": ..., "torch": ...,
                     "tilelang": "0.1.15", "date": ..., "git_commit": ..., ...},
      "entries": [
        {"op": "dense_decode",
         "key": {"dtype": "bfloat16", "head_dim": 128, "g": 7, "hkv": 4,
                 "context": 65536, "batch": 4},          # the problem shape class (KEY_SPECS)
         "config": {"block_N": 64, "num_stages": 2, ...},  # fields of the kernel's config class
         "tuned": true,
         "latency_us": 101.2, "default_latency_us": 130.5, "runner_up_latency_us": 104.0,
         "speedup_vs_default": 1.29, "margin_vs_runner_up": 0.028, ...},
        ...
      ]
    }

Where a schedule comes from, first match wins (``schedule_sources``):

1. ``RESA_TL_SCHEDULE``: a schedule file, or a directory holding ``<arch>.json``;
   ``off`` / ``none`` / ``0`` disables schedules (heuristics only, no warning);
2. the user cache: ``$RESA_TL_CACHE_DIR/schedules/<arch>.json`` (default cache dir
   ``$XDG_CACHE_HOME/resa_tl`` or ``~/.cache/resa_tl``; ``autotune/run.py --install`` writes it);
3. the packaged file ``resa_tl/schedule_data/<arch>.json`` (= repository ``schedules/``).

A file that is corrupt, stamped for another arch, or for another TileLang release is rejected
with one warning naming the file and the reason, and the heuristics are used. A lookup picks
the entry of the nearest shape class (``shape_distance``); when no entry fits, the heuristic
default is used, with one warning per op.

The planning layer (resa_tl.plan) calls :func:`config_for` with the heuristic default, once per
problem. Lookups are host-side and memoised per (op, arch, shape, default), and the answer never
changes within a process, so decoding never recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "resa_tl.schedule/1"

# schedule arch key -> TileLang target arch. Hopper needs the "a" variant (wgmma/TMA).
ARCH_TARGETS = {"sm80": "sm_80", "sm86": "sm_86", "sm89": "sm_89", "sm90": "sm_90a"}

ENV_SCHEDULE = "RESA_TL_SCHEDULE"
ENV_CACHE_DIR = "RESA_TL_CACHE_DIR"

PACKAGE_DIR = Path(__file__).resolve().parent / "schedule_data"
REPO_DIR = Path(__file__).resolve().parent.parent / "schedules"


class ScheduleError(ValueError):
    """A schedule file that cannot be used (corrupt, wrong arch, incompatible TileLang)."""


class ScheduleWarning(UserWarning):
    """resa_tl falls back to a heuristic config (issued once per cause)."""


# ------------------------------------------------------------------------------------------
# Shape classes
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyField:
    """One field of an op's shape key.

    kind "exact": an entry is only usable when the value is equal (the kernel differs).
    kind "cat":   categorical; a mismatch costs ``weight`` (e.g. fp16 may borrow bf16 tiles).
    kind "log":   positive integer; costs ``weight * |log2(a / b)|``; ``max_octaves`` bounds
                  how far an entry may be (None: unbounded).
    """
    name: str
    kind: str
    weight: float = 1.0
    max_octaves: float | None = None


def _f(name, kind, weight=1.0, max_octaves=None):
    return KeyField(name, kind, weight, max_octaves)


# How far a tuned entry may serve another shape. Measured by leaving each tuned shape of the
# 2026-11-27 H100 runs out and letting the rest serve it (autotune/lookup_check.py): unbounded
# nearest-entry borrowing made some shapes up to 1.8x slower than the heuristic (summaries
# configs across KV-head counts, rectify configs across 8x contexts); with the bounds below the
# worst borrowed config was 0.85x and the geometric mean 1.05x. Beyond them, the heuristic.
_DTYPE = _f("dtype", "cat", 0.5)
_D = _f("head_dim", "exact")
_G = _f("g", "log", 1.0, 1.0)          # query heads per KV head; g=6 may use g=4..8 (not 1)
_HKV = _f("hkv", "log", 0.5)           # KV heads: grid width (B * Hkv CTAs before splitting)
_HKV_SUMMARIES = _f("hkv", "log", 0.5, 0.0)   # summaries: the best CTA shape depends on Hkv
_BS = _f("block_size", "exact")
_CTX = _f("context", "log", 0.25, 1.0)   # cache capacity S_max (host-known, no sync)
_BATCH = _f("batch", "log", 0.5, 1.0)

# op -> fields of its shape key. Only host-known values (shapes, Python args): reading the
# row lengths would synchronise the host, so contexts are the cache capacity S_max.
KEY_SPECS: dict[str, tuple[KeyField, ...]] = {
    "dense_decode": (_DTYPE, _D, _G, _HKV, _CTX, _BATCH),
    # k_blocks: width K of block_indices (selected blocks per KV head)
    "sparse_decode": (_DTYPE, _D, _G, _HKV, _BS, _f("k_blocks", "log", 0.25, 1.0), _BATCH),
    # num_blocks: NB = ceil(S_max / block_size), a compile-time constant of the kernel; g only
    # changes the query mean (not the launch shape), so any g may borrow
    "select_blocks": (_DTYPE, _D, _f("g", "log", 0.1), _HKV, _BS,
                      _f("num_blocks", "log", 0.25, 1.0), _BATCH),
    "block_summaries": (_DTYPE, _D, _HKV_SUMMARIES, _BS, _CTX, _BATCH),
    "update_block_summaries": (_DTYPE, _D, _HKV_SUMMARIES, _BS, _f("length", "log", 0.25, 1.0),
                               _BATCH),
    # T: queries per row (the rectification chunk), a compile-time constant
    "rectify_attention": (_DTYPE, _D, _G, _HKV, _f("T", "log", 1.0, 1.0), _CTX, _BATCH),
}

_DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16"}


def normalize_dtype(dtype) -> str:
    """'float16' / 'bfloat16' from a torch dtype or a name."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype!r}")
    return _DTYPE_NAMES[name]


def make_key(op: str, **shape) -> dict:
    """The shape key of ``op`` from keyword values; checks names and types."""
    if op not in KEY_SPECS:
        raise ValueError(f"unknown op {op!r}; known: {sorted(KEY_SPECS)}")
    spec = KEY_SPECS[op]
    names = [f.name for f in spec]
    missing = [n for n in names if n not in shape]
    extra = sorted(set(shape) - set(names))
    if missing or extra:
        raise ValueError(f"shape key of {op} needs fields {names}; missing {missing}, "
                         f"unexpected {extra}")
    key = {}
    for f in spec:
        v = shape[f.name]
        if f.name == "dtype":
            v = normalize_dtype(v)
        elif f.kind in ("log", "exact"):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{op} key field {f.name} must be an int >= 1, got {v!r}")
        key[f.name] = v
    return key


def shape_distance(op: str, entry_key: dict, shape: dict) -> float | None:
    """Distance from a shape to an entry's shape class; None when the entry cannot serve it."""
    d = 0.0
    for f in KEY_SPECS[op]:
        a, b = entry_key[f.name], shape[f.name]
        if f.kind == "exact":
            if a != b:
                return None
        elif f.kind == "cat":
            d += 0.0 if a == b else f.weight
        else:
            octaves = abs(math.log2(a) - math.log2(b))
            if f.max_octaves is not None and octaves > f.max_octaves + 1e-9:
                return None
            d += f.weight * octaves
    return d


def key_sort_tuple(op: str, key: dict) -> tuple:
    """A total order over keys of one op (deterministic files and tie-breaking)."""
    return tuple((f.name, str(key[f.name]) if f.kind == "cat" else int(key[f.name]))
                 for f in KEY_SPECS[op])


# ------------------------------------------------------------------------------------------
# Arch and versions
# ------------------------------------------------------------------------------------------

def arch_key(arch: str) -> str:
    """Schedule arch key ("sm90") from "sm_90a", "sm_90", "sm90", "90" ..."""
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", str(arch).strip().lower())
    if not m:
        raise ValueError(f"cannot parse GPU arch {arch!r}; expected e.g. sm90, sm_90a, sm_80")
    return f"sm{m.group(1)}"


def target_arch(arch: str) -> str:
    """TileLang target arch ("sm_90a") of an arch key or target string."""
    k = arch_key(arch)
    return ARCH_TARGETS.get(k, "sm_" + k[2:] + ("a" if k.startswith("sm9") else ""))


@functools.lru_cache(maxsize=None)
def tilelang_version() -> str | None:
    """Installed TileLang version, read from package metadata (no ``import tilelang``)."""
    try:
        from importlib.metadata import version
        return version("tilelang")
    except Exception:
        pass
    try:
        import tilelang
        return str(tilelang.__version__)
    except Exception:
        return None


def _release(v: str) -> tuple[int, ...] | None:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", str(v))
    return tuple(int(x) for x in m.groups()) if m else None


def tilelang_compatible(recorded: str, installed: str | None) -> bool:
    """Schedules are valid for the TileLang release they were tuned with (major.minor.patch;
    local/dev suffixes ignored). TileLang is 0.x: tile legality, layouts and codegen change
    between patch releases, so a winner may no longer win, or no longer compile."""
    if installed is None:
        return True                     # nothing to compare with (no TileLang: no kernels)
    a, b = _release(recorded), _release(installed)
    return a is not None and a == b


# ------------------------------------------------------------------------------------------
# Schedule objects, parsing, writing
# ------------------------------------------------------------------------------------------

REQUIRED_PROVENANCE = ("gpu", "sm_count", "driver", "cuda", "torch", "tilelang", "date",
                       "git_commit")

_ENTRY_NUMBERS = ("latency_us", "default_latency_us", "runner_up_latency_us",
                  "speedup_vs_default")
# runner_up / winner - 1. Negative (down to minus the tuner's tie tolerance, 1%) where the
# heuristic default kept its place against a runner-up that was faster by less than that.
_ENTRY_MARGINS = ("margin_vs_runner_up",)


@dataclass
class Entry:
    op: str
    key: dict
    config: dict
    tuned: bool
    data: dict = field(default_factory=dict)     # the whole JSON object (latencies, margins ...)

    @property
    def latency_us(self):
        return self.data.get("latency_us")


@dataclass
class Schedule:
    arch: str
    tuned: bool
    provenance: dict
    entries: list[Entry]
    path: str | None = None

    def entries_for(self, op: str) -> list[Entry]:
        return [e for e in self.entries if e.op == op]

    def lookup(self, op: str, **shape) -> Entry | None:
        """The tuned entry of the nearest shape class that can serve ``shape`` (None if
        none)."""
        shape = make_key(op, **shape)
        best, best_d = None, None
        for e in self.entries:
            if e.op != op:
                continue
            d = shape_distance(op, e.key, shape)
            if d is None:
                continue
            if not e.tuned:
                continue
            if best is None or d < best_d - 1e-12 or (
                    abs(d - best_d) <= 1e-12
                    and key_sort_tuple(op, e.key) < key_sort_tuple(op, best.key)):
                best, best_d = e, d
        return best

    def to_json(self) -> dict:
        entries = sorted(self.entries, key=lambda e: (e.op, key_sort_tuple(e.op, e.key)))
        out = []
        for e in entries:
            d = dict(e.data)
            d.update(op=e.op, key=e.key, config=e.config, tuned=e.tuned)
            first = {k: d.pop(k) for k in ("op", "key", "config", "tuned")}
            out.append({**first, **dict(sorted(d.items()))})
        return {"format": FORMAT, "arch": self.arch, "tuned": self.tuned,
                "provenance": dict(sorted(self.provenance.items())), "entries": out}


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def parse_schedule(obj: Any, *, path: str | None = None, expect_arch: str | None = None,
                   installed_tilelang: str | None = "auto") -> Schedule:
    """Validate a decoded schedule JSON object; raise ScheduleError naming the problem.

    ``expect_arch``: the arch the caller runs on (rejects other arches).
    ``installed_tilelang``: version to check against ("auto": the installed one; None: skip).
    """
    where = path or "<schedule>"

    def bad(msg):
        raise ScheduleError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        bad("top level must be a JSON object")
    if obj.get("format") != FORMAT:
        bad(f"format must be {FORMAT!r}, got {obj.get('format')!r}")
    arch = obj.get("arch")
    if not isinstance(arch, str) or not re.fullmatch(r"sm\d{2,3}", arch):
        bad(f"arch must be like 'sm90', got {arch!r}")
    if expect_arch is not None and arch != arch_key(expect_arch):
        bad(f"stamped for arch {arch}, but this GPU is {arch_key(expect_arch)}; "
            f"tune one with `python autotune/run.py --arch {arch_key(expect_arch)}`")
    tuned = obj.get("tuned")
    if not isinstance(tuned, bool):
        bad("'tuned' must be true or false")
    prov = obj.get("provenance")
    if not isinstance(prov, dict):
        bad("'provenance' must be an object")
    missing = [k for k in REQUIRED_PROVENANCE if k not in prov]
    if missing:
        bad(f"provenance lacks {missing}")
    if not isinstance(prov.get("tilelang"), str) or _release(prov["tilelang"]) is None:
        bad(f"provenance.tilelang must be a version string, got {prov.get('tilelang')!r}")
    if installed_tilelang == "auto":
        installed_tilelang = tilelang_version()
    if installed_tilelang is not None and not tilelang_compatible(prov["tilelang"],
                                                                  installed_tilelang):
        bad(f"tuned with TileLang {prov['tilelang']}, but TileLang {installed_tilelang} is "
            f"installed; its configs may not compile or win there: re-tune with "
            f"autotune/run.py")
    raw = obj.get("entries")
    if not isinstance(raw, list):
        bad("'entries' must be a list")
    entries, seen = [], set()
    for i, e in enumerate(raw):
        at = f"entry {i}"
        if not isinstance(e, dict):
            bad(f"{at} must be an object")
        op = e.get("op")
        if op not in KEY_SPECS:
            bad(f"{at}: unknown op {op!r} (known: {sorted(KEY_SPECS)})")
        key = e.get("key")
        if not isinstance(key, dict):
            bad(f"{at} ({op}): 'key' must be an object")
        try:
            key = make_key(op, **key)
        except (TypeError, ValueError) as err:
            bad(f"{at} ({op}): bad key: {err}")
        cfg = e.get("config")
        if not isinstance(cfg, dict) or not cfg or not all(
                isinstance(k, str) and _is_scalar(v) for k, v in cfg.items()):
            bad(f"{at} ({op}): 'config' must be a non-empty object of scalar fields")
        et = e.get("tuned", tuned)
        if not isinstance(et, bool):
            bad(f"{at} ({op}): 'tuned' must be true or false")
        if et and not tuned:
            bad(f"{at} ({op}): tuned entry in a schedule whose header says tuned=false")
        for k in _ENTRY_NUMBERS:
            v = e.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v < 0):
                bad(f"{at} ({op}): {k} must be a finite number >= 0 or null, got {v!r}")
        for k in _ENTRY_MARGINS:
            v = e.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= -1):
                bad(f"{at} ({op}): {k} must be a finite number > -1 or null, got {v!r}")
        if et and not e.get("latency_us"):
            bad(f"{at} ({op}): a tuned entry needs latency_us")
        ident = (op, tuple(sorted(key.items())))
        if ident in seen:
            bad(f"{at} ({op}): duplicate shape key {key}")
        seen.add(ident)
        entries.append(Entry(op=op, key=key, config=dict(cfg), tuned=et, data=dict(e)))
    return Schedule(arch=arch, tuned=tuned, provenance=dict(prov), entries=entries, path=path)


def load_schedule(path, *, expect_arch: str | None = None,
                  installed_tilelang: str | None = "auto") -> Schedule:
    """Read and validate a schedule file (ScheduleError on any problem)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ScheduleError(f"{p}: cannot read: {err}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ScheduleError(f"{p}: corrupt JSON: {err}") from None
    return parse_schedule(obj, path=str(p), expect_arch=expect_arch,
                          installed_tilelang=installed_tilelang)


def write_schedule(schedule: Schedule, path) -> Path:
    """Write deterministically (sorted entries and keys), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(schedule.to_json(), indent=1) + "\n")
    os.replace(tmp, p)
    return p


# ------------------------------------------------------------------------------------------
# Run-time resolution (memoised, warns once per cause)
# ------------------------------------------------------------------------------------------

def user_cache_dir() -> Path:
    d = os.environ.get(ENV_CACHE_DIR)
    if d:
        return Path(d).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resa_tl"


def packaged_schedule_path(arch: str) -> Path | None:
    """The shipped schedule of ``arch``: resa_tl/schedule_data/ (a wheel, or the checkout's
    symlink to schedules/), else the repository's schedules/ directory."""
    name = f"{arch_key(arch)}.json"
    for d in (PACKAGE_DIR, REPO_DIR):
        if (d / name).is_file():
            return d / name
    return None


def schedule_sources(arch: str) -> list[tuple[str, Path | None]]:
    """Candidate (origin, path) pairs in priority order; path None = disabled."""
    a = arch_key(arch)
    out = []
    env = os.environ.get(ENV_SCHEDULE, "").strip()
    if env:
        if env.lower() in ("off", "none", "0", "false", "heuristic"):
            return [("env:off", None)]
        p = Path(env).expanduser()
        out.append((f"${ENV_SCHEDULE}", p / f"{a}.json" if p.is_dir() else p))
    out.append(("user cache", user_cache_dir() / "schedules" / f"{a}.json"))
    pk = packaged_schedule_path(a)
    if pk is not None:
        out.append(("packaged", pk))
    return out


_lock = threading.Lock()
_warned: set = set()


def _warn_once(tag, msg: str) -> None:
    with _lock:
        if tag in _warned:
            return
        _warned.add(tag)
    warnings.warn(msg, ScheduleWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def active_schedule(arch: str) -> Schedule | None:
    """The schedule used for ``arch`` in this process (None: heuristics). The first existing
    source wins; a rejected file gives one warning and no schedule (heuristics)."""
    a = arch_key(arch)
    for origin, path in schedule_sources(a):
        if path is None:
            return None
        if origin != f"${ENV_SCHEDULE}" and not path.is_file():
            continue
        try:
            return load_schedule(path, expect_arch=a)
        except ScheduleError as err:
            _warn_once(("file", str(path)),
                       f"resa_tl: ignoring the kernel schedule from {origin} ({err}); using the "
                       f"heuristic kernel configs")
            return None
    _warn_once(("nofile", a),
               f"resa_tl: no kernel schedule for {a} (none packaged, none in "
               f"{user_cache_dir() / 'schedules'}, ${ENV_SCHEDULE} unset); using the heuristic "
               f"kernel configs. Tune with `python autotune/run.py --arch {a} --install`.")
    return None


def apply_config(default, config: dict):
    """``default`` (a dataclass instance or a dict) with the fields of ``config``; raises
    ValueError/TypeError when the config does not fit the kernel's config class."""
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        names = {f.name for f in dataclasses.fields(default)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"fields {unknown} are not in {type(default).__name__} "
                             f"({sorted(names)})")
        return dataclasses.replace(default, **config)
    if isinstance(default, dict):
        unknown = sorted(set(config) - set(default))
        if unknown:
            raise ValueError(f"fields {unknown} are not in the config {sorted(default)}")
        return {**default, **config}
    raise TypeError(f"config default must be a dataclass instance or a dict, "
                    f"got {type(default).__name__}")


def config_to_dict(config) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"config must be a dataclass instance or a dict, got {type(config).__name__}")


def _resolve(op: str, default, arch: str, shape: dict):
    sched = active_schedule(arch)
    if sched is None or not sched.tuned:
        # an untuned schedule only records that the heuristic configs compile: the heuristic,
        # evaluated on the actual shape, is at least as good as a neighbour's heuristic choice
        return default
    entry = sched.lookup(op, **shape)
    if entry is None:
        _warn_once(("nofit", arch_key(arch), op),
                   f"resa_tl: the {arch_key(arch)} schedule ({sched.path}) has no entry for "
                   f"{op} that fits {shape}; using the heuristic config {default} (further "
                   f"misses of {op} are not reported)")
        return default
    try:
        return apply_config(default, entry.config)
    except (TypeError, ValueError) as err:
        _warn_once(("badcfg", sched.path, op, tuple(sorted(entry.key.items()))),
                   f"resa_tl: schedule entry {op} {entry.key} in {sched.path} does not fit the "
                   f"kernel ({err}); using the heuristic config")
        return default


_MEMO: dict = {}


def config_for(op: str, default, *, arch: str, **shape):
    """The config ``op`` runs with for this shape: the nearest tuned schedule entry's config
    merged into ``default`` (the heuristic's choice, a frozen dataclass or a dict), else
    ``default``.

    ``arch``: TileLang arch ("sm_90a") or schedule key ("sm90"); ``shape``: the op's
    KEY_SPECS fields, host-known values only (dtype may be a torch dtype). Memoised per
    (op, arch, default, shape): a repeated call costs one dict lookup, and the answer never
    changes within a process (call :func:`reset` to reload).
    """
    memo = (op, arch, default, tuple(shape.items()))
    try:
        return _MEMO[memo]
    except KeyError:
        pass
    except TypeError:                      # unhashable default (a dict): resolve uncached
        return _resolve(op, default, arch, make_key(op, **shape))
    res = _resolve(op, default, arch, make_key(op, **shape))
    with _lock:
        _MEMO[memo] = res
    return res


def reset() -> None:
    """Forget loaded schedules, memoised lookups and issued warnings (tests, or after changing
    RESA_TL_SCHEDULE at run time), and the plans resolved with them (resa_tl.plan), so the next
    op re-plans. Kernels already compiled stay in TileLang's caches."""
    from . import plan
    plan.clear()
    active_schedule.cache_clear()
    _MEMO.clear()
    tilelang_version.cache_clear()
    with _lock:
        _warned.clear()


def describe(arch: str) -> str:
    """One line saying which schedule ``arch`` uses (for logs and reports)."""
    s = active_schedule(arch)
    if s is None:
        return f"{arch_key(arch)}: heuristics (no schedule)"
    return (f"{arch_key(arch)}: {s.path} ({'tuned' if s.tuned else 'untuned'}, "
            f"{len(s.entries)} entries, {s.provenance.get('gpu')}, "
            f"{s.provenance.get('date')})")
