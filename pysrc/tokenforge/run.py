"""Run an unmodified training script with tokenforge's kernels put in before its imports.

    tokenforge run [--kernels LIST] [--optimizer] [--report FILE.json] script.py [args...]
    python -m tokenforge.run [...] script.py [args...]
    torchrun --nproc-per-node 8 -m tokenforge.run [...] script.py [args...]

What is installed, before the first line of the script runs:

- SDPA routing: ``F.scaled_dot_product_attention`` calls the attention kernel supports go to it
  (``tokenforge.sdpa_patch``); the rest run PyTorch's own, counted as passed through.
- Hugging Face causal LMs of the families ``tokenforge.patch`` knows are patched as they are built:
  after ``from_pretrained`` / ``from_config`` return, and at the end of a direct constructor call
  (``LlamaForCausalLM(config)``). Other Hugging Face models are left alone and named in the report.
- tokenforge's reference ``Transformer`` is patched when constructed (a script that calls
  ``tokenforge.patch`` itself on it gets its own options: the automatic patch is undone first).
- ``--optimizer``: ``torch.optim.AdamW(...)`` builds tokenforge's fused AdamW (same arguments,
  same param groups and state format); ``isinstance(opt, torch.optim.AdamW)`` stays true.

``--kernels`` picks the parts: ``all`` (the default), ``none``, or a comma list of attention,
rms_norm, rope, swiglu, cross_entropy, moe. At exit (also when the script fails or calls
sys.exit) a report goes to stderr, and with ``--report`` to a JSON file: what was patched, what
was left alone and why, and how many calls each kernel path took (eager calls; calls traced by
torch.compile are not counted). The script's own exit status is the command's.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import runpy
import sys
import threading
import weakref
from typing import Any, Callable, Optional

PARTS = ("attention", "rms_norm", "rope", "swiglu", "cross_entropy", "moe")


class UsageError(ValueError):
    """A bad command line: one line to stderr, exit status 2."""


def parse_kernels(text: str) -> dict[str, bool]:
    """``all`` / ``none`` / ``a,b,...`` -> tokenforge.patch options."""
    text = text.strip()
    if text == "all":
        return {p: True for p in PARTS}
    if text == "none":
        return {p: False for p in PARTS}
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in PARTS]
    if unknown or not chosen:
        raise UsageError(f"--kernels: unknown part(s) {', '.join(unknown) or repr(text)}; "
                         f"use all, none or a comma list of {', '.join(PARTS)}")
    return {p: p in chosen for p in PARTS}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback(module)`` once ``name`` has been imported (at once if it already is), without
    importing it ourselves: a script that never imports transformers pays nothing for it."""

    def __init__(self, name: str, callback: Callable[[Any], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader, callback = spec.loader, self.callback
                original_exec = loader.exec_module

                def exec_module(module, _original=original_exec):
                    _original(module)
                    callback(module)

                loader.exec_module = exec_module
                return spec
        return None


class Session:
    """What `tokenforge run` installed, and what it saw; :meth:`uninstall` puts everything back."""

    def __init__(self, options: dict[str, bool], optimizer: bool):
        self.options = options
        self.optimizer = optimizer
        self.patched: list[dict] = []      # one entry per patched model
        self.left_alone: dict[str, str] = {}
        self._candidates: list[weakref.ref] = []  # Hugging Face models built but not patched
        self._undo: list[Callable[[], None]] = []
        self._building = threading.local()
        self._finders: list[_AfterImport] = []
        self.optimizers: dict[str, int] = {}

    # -- hooks ------------------------------------------------------------------------------
    def install(self) -> None:
        from tokenforge import sdpa_patch
        from tokenforge.patch import calls

        self._calls_at_start = dict(calls)
        self._sdpa_at_start = dict(sdpa_patch.stats)
        if self.options["attention"] and not sdpa_patch.is_installed():
            sdpa_patch.install()
            self._undo.append(sdpa_patch.uninstall)
        self._hook_module("transformers.modeling_utils", self._hook_transformers)
        self._hook_module("tokenforge.models.transformer", self._hook_reference_model)
        if self.optimizer:
            self._hook_adamw()

    def _hook_module(self, name: str, callback: Callable[[Any], None]) -> None:
        if name in sys.modules:
            callback(sys.modules[name])
            return
        finder = _AfterImport(name, callback)
        sys.meta_path.insert(0, finder)
        self._finders.append(finder)

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        old = obj.__dict__[attr]  # a class attribute (classmethod objects included) as stored
        setattr(obj, attr, value)
        self._undo.append(lambda: setattr(obj, attr, old))

    def _depth(self) -> int:
        return getattr(self._building, "depth", 0)

    def _hook_transformers(self, modeling_utils) -> None:
        base = modeling_utils.PreTrainedModel
        session = self

        original_post_init = base.__dict__["post_init"]

        def post_init(model, *args, **kwargs):
            original_post_init(model, *args, **kwargs)
            if session._depth() == 0:
                session.adopt(model)

        self._set(base, "post_init", post_init)
        for name in ("from_pretrained", "_from_config"):
            stored = base.__dict__.get(name)
            if not isinstance(stored, classmethod):
                continue
            self._set(base, name, classmethod(self._building_wrapper(stored.__func__)))

    def _building_wrapper(self, func: Callable) -> Callable:
        session = self

        def build(cls, *args, **kwargs):
            session._building.depth = session._depth() + 1
            try:
                result = func(cls, *args, **kwargs)
            finally:
                session._building.depth -= 1
            if session._depth() == 0:
                session.adopt(result[0] if isinstance(result, tuple) else result)
            return result

        build.__name__, build.__doc__, build.__wrapped__ = func.__name__, func.__doc__, func
        return build

    def _hook_reference_model(self, module) -> None:
        cls = module.Transformer
        original_init = cls.__dict__["__init__"]
        session = self

        def __init__(model, *args, **kwargs):
            original_init(model, *args, **kwargs)
            if type(model) is cls:
                session.adopt(model)

        self._set(cls, "__init__", __init__)

    def _hook_adamw(self) -> None:
        import torch

        from tokenforge.optim import AdamW as FusedAdamW

        torch_adamw = torch.optim.AdamW
        session = self

        class _RoutedAdamWMeta(type(torch_adamw)):
            def __instancecheck__(cls, obj):
                return isinstance(obj, (torch_adamw, FusedAdamW))

            def __subclasscheck__(cls, sub):
                return issubclass(sub, (torch_adamw, FusedAdamW))

        class AdamW(torch_adamw, metaclass=_RoutedAdamWMeta):
            """torch.optim.AdamW under `tokenforge run --optimizer`: builds tokenforge's fused AdamW,
            or torch's own (counted and reported) for arguments the fused one refuses."""

            def __new__(cls, *args, **kwargs):
                try:
                    opt = FusedAdamW(*args, **kwargs)
                except (ValueError, TypeError) as exc:
                    session.left_alone["optimizer"] = f"torch.optim.AdamW kept: {str(exc).splitlines()[0]}"
                    session.optimizers["torch.optim.AdamW"] = session.optimizers.get("torch.optim.AdamW", 0) + 1
                    return torch_adamw(*args, **kwargs)
                session.optimizers["tokenforge.optim.AdamW"] = session.optimizers.get("tokenforge.optim.AdamW", 0) + 1
                return opt

        AdamW.__module__, AdamW.__qualname__ = torch_adamw.__module__, torch_adamw.__qualname__
        self._set(torch.optim, "AdamW", AdamW)
        import torch.optim.adamw as adamw_module

        if adamw_module.__dict__.get("AdamW") is torch_adamw:
            self._set(adamw_module, "AdamW", AdamW)

    # -- models -----------------------------------------------------------------------------
    def adopt(self, model) -> None:
        """Patch ``model`` when it is a family tokenforge knows; otherwise remember it (the report
        names the top-level models left alone)."""
        import tokenforge
        from tokenforge.patch import _UNDO_ATTR, _family, _own

        if _own(model, _UNDO_ATTR) is not None:
            return
        family = _family(model)
        if family == "generic":
            self._candidates.append(weakref.ref(model))
            return
        try:
            report = tokenforge.patch(model, **self.options)
        except Exception as exc:  # a model we cannot patch still trains, unpatched, and is reported
            self.left_alone[type(model).__name__] = f"tokenforge.patch failed: {str(exc).splitlines()[0]}"
            return
        object.__setattr__(model, "_tokenforge_auto_patched", True)
        self.patched.append({"model": report.model, "family": report.family,
                             "patched": list(report.patched), "skipped": list(report.skipped)})

    def _unpatched_top_level(self) -> list[str]:
        from tokenforge.patch import _UNDO_ATTR, _own

        alive = [r() for r in self._candidates]
        alive = [m for m in alive if m is not None and _own(m, _UNDO_ATTR) is None]
        inner = set()
        for m in alive:
            for sub in list(m.modules())[1:]:
                inner.add(id(sub))
        return sorted({type(m).__name__ for m in alive if id(m) not in inner})

    # -- report -----------------------------------------------------------------------------
    def report(self) -> dict:
        from tokenforge import sdpa_patch
        from tokenforge.patch import _HF_FAMILIES
        from tokenforge.patch import calls as all_calls

        calls = {k: v - self._calls_at_start.get(k, 0) for k, v in all_calls.items()}
        calls = {k: v for k, v in sorted(calls.items()) if v}
        sdpa = {k: sdpa_patch.stats[k] - self._sdpa_at_start.get(k, 0) for k in ("routed", "passed")}
        if self.options["attention"]:
            calls["attention (sdpa routed)"] = sdpa["routed"]
            calls["attention (sdpa passed through to PyTorch)"] = sdpa["passed"]
        left = dict(self.left_alone)
        known = ", ".join(sorted(_HF_FAMILIES))
        for name in self._unpatched_top_level():
            left[name] = f"not a model family tokenforge patches (it patches {known} and tokenforge's Transformer)"
        return {"kernels": [p for p, on in self.options.items() if on], "optimizer": self.optimizer,
                "models": self.patched, "left_alone": left, "calls": calls, "optimizers": dict(self.optimizers)}

    def uninstall(self) -> None:
        for finder in self._finders:
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
        self._finders.clear()
        for step in reversed(self._undo):
            step()
        self._undo.clear()


def format_report(report: dict) -> str:
    lines = [f"tokenforge run: kernels {','.join(report['kernels']) or 'none'}"
             + (", fused AdamW" if report["optimizer"] else "")]
    if not report["models"]:
        lines.append("  no model was patched")
    for m in report["models"]:
        lines.append(f"  patched {m['model']} (family {m['family']})")
        lines += [f"    patched  {p}" for p in m["patched"]]
        lines += [f"    skipped  {s}" for s in m["skipped"]]
    for name, why in report["left_alone"].items():
        lines.append(f"  left alone {name}: {why}")
    for op, n in report["calls"].items():
        lines.append(f"  calls  {op}: {n}")
    for name, n in report["optimizers"].items():
        lines.append(f"  optimizer  {name}: {n} built")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenforge run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="all", help="all (default), none, or a comma list of " + ", ".join(PARTS))
    p.add_argument("--optimizer", action="store_true", help="torch.optim.AdamW builds tokenforge's fused AdamW")
    p.add_argument("--report", metavar="FILE.json", help="also write the report as JSON here")
    p.add_argument("--quiet", action="store_true", help="no report on stderr (the --report file is still written)")
    p.add_argument("script", help="the training script, run as __main__")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        options = parse_kernels(args.kernels)
        if not os.path.isfile(args.script):
            raise UsageError(f"no such script: {args.script}")
        if args.report and not os.path.isdir(os.path.dirname(os.path.abspath(args.report))):
            raise UsageError(f"--report: the folder of {args.report} does not exist")
    except UsageError as exc:
        print(f"tokenforge run: {exc}", file=sys.stderr)
        return 2
    session = Session(options, args.optimizer)
    session.install()
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    sys.argv = [args.script] + list(args.args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    status = 0
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        status = code if isinstance(code, int) else (0 if code is None else 1)
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()  # the script's own error, as python would show it
        status = 1
    finally:
        sys.argv = saved_argv
        if sys.path and saved_path0 is not None and sys.path[0] != saved_path0:
            del sys.path[0]
        report = session.report()
        report["script"], report["exit_status"] = args.script, status
        # Under torchrun every rank runs this: rank 0 prints, each rank writes its own file.
        rank = int(os.environ.get("RANK", "0") or 0)
        if not args.quiet and rank == 0:
            print(format_report(report), file=sys.stderr)
        if args.report:
            path = args.report
            if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and rank > 0:
                root, ext = os.path.splitext(path)
                path = f"{root}.rank{rank}{ext}"
            with open(path, "w") as f:
                json.dump(report, f, indent=2)
        session.uninstall()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
