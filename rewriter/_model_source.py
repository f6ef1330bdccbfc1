"""Where the command line gets a model from: `file.py:factory`, `package.module:factory`, or a
saved `.pt2`; and the checks on output paths made before any work starts.

Every problem with what the user typed or pointed at raises `UsageError` with one line that
says what is wrong and what to do (the CLI prints it and exits 2).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "ModelSource", "load_model", "load_factory", "load_pt2", "check_writable"]

SPEC_HELP = "path/to/file.py:factory, package.module:factory (a callable returning (model, example_inputs)) or a saved .pt2"


class UsageError(Exception):
    """A mistake in the command line or in what it points at (exit code 2)."""


@dataclass
class ModelSource:
    model: Any  # torch.nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    spec: str = ""


def _first_line(e: BaseException) -> str:
    """`Type: first sentence of the message` (torch's messages run on for lines)."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    text = lines[0].split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {text[:300]}"


def load_model(spec: str) -> ModelSource:
    """MODEL as typed on the command line → the model and its example inputs."""
    if spec.endswith(".pt2") and ":" not in Path(spec).name:
        return load_pt2(spec)
    return load_factory(spec)


def _import_file(where: str):
    path = Path(where)
    if not path.is_file():
        raise UsageError(f"no such file: {where}")
    name = f"_rewriter_model_{path.stem}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up there
    entry = str(path.parent.resolve())
    sys.path.insert(0, entry)  # the file may import its neighbours
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file failed to run
        del sys.modules[name]
        raise UsageError(f"cannot load {where}: {_first_line(e)}") from e
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)
    return module


def _import_module(where: str):
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name and where.startswith(e.name):  # the module itself, not one it imports
            raise UsageError(f"no module named {where!r} (for a file, write path/to/file.py:factory)") from e
        raise UsageError(f"cannot import {where}: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot import {where}: {_first_line(e)}") from e


def load_factory(spec: str) -> ModelSource:
    """`path/to/file.py:factory` or `package.module:factory` → the factory's (model, inputs)."""
    import torch

    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UsageError(f"MODEL must be {SPEC_HELP}; got {spec!r}")
    module = _import_file(where) if where.endswith(".py") else _import_module(where)
    factory = getattr(module, name, None)
    if factory is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        hint = f" (it defines: {', '.join(found[:8])})" if found else ""
        raise UsageError(f"{where} has no factory named {name!r}{hint}")
    if not callable(factory):
        raise UsageError(f"{where}:{name} is not callable (it is {type(factory).__name__}); name a factory function")
    try:
        out = factory()
    except Exception as e:  # noqa: BLE001 - the user's code failed; say which and how
        raise UsageError(f"factory {name} in {where} raised {_first_line(e)}") from e
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = f"a {type(out).__name__} of {len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
        raise UsageError(f"factory {name} in {where} must return (model, example_inputs), got {got}")
    model, inputs = out
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"factory {name} in {where} returned {type(model).__name__} as the model; "
                         "expected a torch.nn.Module")
    args, kwargs = _inputs(inputs, f"factory {name} in {where}")
    return ModelSource(model, args, kwargs, spec)


def _inputs(inputs, who: str) -> tuple[tuple, dict]:
    import torch

    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise UsageError(f"{who} returned {type(inputs).__name__} as example_inputs; "
                     "expected a tensor, a tuple of inputs, or a dict of keyword inputs")


def _version_problem(path: str) -> str | None:
    """Compare the archive's format and schema versions with this torch's, before loading."""
    import torch
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch.export.pt2_archive.constants import ARCHIVE_VERSION_PATH, ARCHIVE_VERSION_VALUE

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            version = next((n for n in names if n.split("/", 1)[-1] == ARCHIVE_VERSION_PATH), None)
            model_json = next((n for n in names if n.endswith("models/model.json")), None)
            if version is None or model_json is None:
                return None  # not the current layout: torch.export.load says what it makes of it
            archive = z.read(version).decode().strip()
            meta = json.loads(z.read(model_json))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path} is not a valid .pt2 archive (corrupt, or not written by torch.export.save): "
                         f"{_first_line(e)}") from e
    schema = meta.get("schema_version") or {}
    saved_by = meta.get("torch_version") or "another torch version"
    if archive != ARCHIVE_VERSION_VALUE or schema.get("major", SCHEMA_VERSION[0]) != SCHEMA_VERSION[0]:
        return (f"{path} was saved by torch {saved_by} (archive {archive}, schema {schema.get('major')}."
                f"{schema.get('minor')}); torch {torch.__version__} reads archive {ARCHIVE_VERSION_VALUE}, schema "
                f"{SCHEMA_VERSION[0]}.x: re-save it with this torch, or pass MODEL as file.py:factory")
    return None


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _torch_export_log():
    """torch.export.load logs the real error as a warning, then raises a generic one: collect
    the logged errors (and print none of them); the CLI says what went wrong in one line."""
    logger, handler = logging.getLogger("torch.export"), _Collect()
    handlers, propagate = logger.handlers, logger.propagate  # torch installs its own stderr handler
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler.errors
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def load_pt2(path: str) -> ModelSource:
    """A saved ExportedProgram; its example inputs come from the archive."""
    import torch

    if not Path(path).is_file():
        raise UsageError(f"no such file: {path}")
    problem = _version_problem(path)
    if problem:
        raise UsageError(problem)
    try:
        with _torch_export_log() as logged:
            ep = torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - rephrased: a version mismatch, or a damaged file
        cause = logged[-1] if logged else e
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        if "version" in text and "does not match" in text:
            raise UsageError(f"{path} was saved by a different torch version ({text}); "
                             f"re-save it with torch {torch.__version__}, or pass MODEL as file.py:factory") from e
        raise UsageError(f"{path} is not a valid .pt2 archive (corrupt, or not written by torch.export.save): "
                         f"{_first_line(cause)}") from e
    example = getattr(ep, "example_inputs", None)
    if not example:
        raise UsageError(f"{path} carries no example inputs; pass MODEL as file.py:factory "
                         "(a callable returning (model, example_inputs)) instead")
    args, kwargs = example
    return ModelSource(ep.module(), tuple(args), dict(kwargs or {}), path)


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Fail now, before any work, if `path` cannot be written (nothing is left behind)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{what} {path} is a directory; give a file name")
    if not parent.exists():
        raise UsageError(f"cannot write {what} {path}: the directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UsageError(f"cannot write {what} {path}: {parent} is not a directory")
    try:  # os.access is not enough (root, read-only mounts): try it
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
    except OSError as e:
        raise UsageError(f"cannot write {what} {path}: {e.strerror or e} in {parent}; choose another directory") from e
    os.close(fd)
    os.remove(probe)
    return p
