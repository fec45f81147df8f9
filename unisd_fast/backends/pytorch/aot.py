"""Block functions compiled ahead of time, in a subprocess, and loaded as shared libraries.

``torch.compile`` compiles in the calling process: importing dynamo and inductor and tracing
a graph leave about 220 MiB more in a fresh process's resident set than its steady state
needs, more than the whole gradient of a UniSD* call at 4 x 256 x 32000 (125 MiB). Here a
block function is exported (``torch.export``, the rows dynamic) and compiled by
AOTInductor in a child process (``python -m unisd_fast.backends.pytorch.aot SPEC``), which
writes a package into the cache directory; this process only loads the package's library
(``torch._C._aoti``, no dynamo or inductor import) and runs it. One package serves every
row count of its input dtypes and vocabulary size, in later processes too.

The cache directory is ``UNISD_FAST_AOT_CACHE``, else ``unisd_fast_aot`` under
``TORCHINDUCTOR_CACHE_DIR`` (or inductor's default root); a package's name hashes the torch
version, the source of the block functions and the input signature.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

# A build is one export and one AOTInductor compile (a minute or two on a loaded 2-core CPU).
BUILD_TIMEOUT_S = 1800
# Example rows of the export (any count above the 0/1 specialisation).
EXAMPLE_ROWS = 3
_SOURCES = ("passes.py", "backend.py", "compiler.py", "aot.py", os.path.join("..", "stable.py"))


def cache_dir() -> Path:
    """Where the packages live (see the module docstring)."""
    explicit = os.environ.get("UNISD_FAST_AOT_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return Path(root) / "unisd_fast_aot"


def signature(args) -> list | None:
    """Per argument (dtype, dims) of a tensor, dims "rows" then the vocabulary for a 2-D one
    (static, as in torch.compile's graphs, whose code is some 15% faster than with a dynamic
    vocabulary), ["rows"] for 1-D, [] for 0-dim; None when an argument is not a tensor or a
    tensor is not contiguous (the compiled code assumes the export's layout)."""
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor) or not a.is_contiguous() or a.dim() > 2:
            return None
        out.append((str(a.dtype).removeprefix("torch."), ["rows", *a.shape[1:]][:a.dim()]))
    return out


def _source_hash() -> str:
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(torch.__version__.encode())
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


class AotFunctions:
    """Loads (building on first use) the package of each (block function, signature).
    ``registry`` names the block functions: "module:attribute" of an iterable of them, which
    the build process imports. A failed build is warned about once and not retried; the
    caller then runs the function another way."""

    def __init__(self, registry: str, options: dict | None = None):
        self.registry = registry
        self.options = options or {}
        self._runners: dict = {}
        self._source = None

    def runner(self, fn, args):
        """A callable running ``fn(*args)`` from its package, or None where none can serve
        (an argument that is not a contiguous tensor of at most 2 dimensions, a row count
        below 2, a build that failed)."""
        sig = signature(args)
        if sig is None or (args[0].dim() > 0 and args[0].shape[0] < 2):
            return None
        key = (fn.__name__, json.dumps(sig))
        if key not in self._runners:
            self._runners[key] = self._load(fn.__name__, sig)
        return self._runners[key]

    def _load(self, name: str, sig: list):
        if self._source is None:
            self._source = _source_hash()
        spec = {"registry": self.registry, "name": name, "signature": sig,
                "options": self.options}
        tag = hashlib.sha256(json.dumps([spec, self._source]).encode()).hexdigest()[:24]
        path = cache_dir() / f"{name}-{tag}.pt2"
        meta = path.with_suffix(".json")
        if not (path.exists() and meta.exists()):
            error = _build(spec, path)
            if error is not None:
                warnings.warn(f"unisd_fast: ahead-of-time build of {name} failed ({error}); "
                              "it runs through torch.compile instead", RuntimeWarning,
                              stacklevel=4)
                return None
        outputs = json.loads(meta.read_text())["outputs"]
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

        def run(*args):
            outs = loader.run(list(args))
            if outputs == "none":
                return None
            return outs[0] if outputs == "tensor" else tuple(outs)

        return run


def _build(spec: dict, path: Path) -> str | None:
    """Build ``path`` in a child process; None on success, else what went wrong."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "unisd_fast.backends.pytorch.aot", json.dumps(spec),
           str(path), str(torch.get_num_threads())]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no package after {BUILD_TIMEOUT_S} s"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit code {done.returncode}"
    return None


def _examples(sig):
    """Example tensors of a signature and their dynamic shapes (the rows, dim 0)."""
    from torch.export import Dim

    rows = Dim("rows", min=2)
    args, shapes = [], []
    for dtype_name, dims in sig:
        dtype = getattr(torch, dtype_name)
        shape = [EXAMPLE_ROWS if d == "rows" else d for d in dims]
        if dtype == torch.bool:
            args.append(torch.ones(shape, dtype=dtype))
        elif dtype.is_floating_point:
            args.append(torch.rand(shape, dtype=dtype) + 0.5)
        else:
            args.append(torch.zeros(shape, dtype=dtype))
        shapes.append({0: rows} if dims else None)
    return tuple(args), tuple(shapes)


def main(argv=None) -> None:
    """The build process: export the named block function at ``signature``, compile it with
    AOTInductor and write the package and its output kind (atomically) to ``path``."""
    spec, path, threads = (argv or sys.argv[1:])[:3]
    spec, path = json.loads(spec), Path(path)
    torch.set_num_threads(int(threads))
    module, attr = spec["registry"].split(":")
    fn = {f.__name__: f for f in getattr(importlib.import_module(module), attr)}[spec["name"]]

    class Block(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    args, shapes = _examples(spec["signature"])
    result = fn(*(a.clone() for a in args))
    outputs = ("none" if result is None else "tensor" if isinstance(result, torch.Tensor)
               else "tuple")
    program = torch.export.export(Block(), args, dynamic_shapes=(shapes,))
    tmp = path.with_name(f".{os.getpid()}.{path.name}")
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                             inductor_configs=dict(spec["options"]))
    path.with_suffix(".json").write_text(json.dumps({"outputs": outputs}))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
