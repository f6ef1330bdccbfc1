"""Calls as Hugging Face code makes them: the KV cache, default flags, generate().

A captured graph computes a function of tensors; a `DynamicCache` (a mutable object that
grows at every step) is not one. So a model whose forward takes `use_cache` is captured
and run with `use_cache=False`, and the report says so: the optimised model returns no
cache, and `generate()` decodes by running the whole sequence again for every new token
(one capture, the sequence dim dynamic). A call that hands in a cache, or asks for one,
gets one error that says what to do instead.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

from torch import nn

from .capture import CaptureError

__all__ = ["CacheError", "prepare_call", "generate", "CACHE_OFF_NOTE"]


CACHE_NAMES = ("past_key_values", "cache", "past_key_value", "past")  # the cache argument, as versions name it
CACHE_OFF_NOTE = ("KV cache off: captured with use_cache=False, so outputs carry no past_key_values; "
                  "generate() re-runs the full sequence for each new token")
# flags whose value equal to the model's config changes nothing: dropped when they would go
# through a **kwargs parameter (torch.export cannot take non-tensor values there with dynamic dims)
_CONFIG_FLAGS = {"return_dict": "return_dict", "output_attentions": "output_attentions",
                 "output_hidden_states": "output_hidden_states"}


class CacheError(CaptureError, ValueError):
    """The call hands in a KV cache or asks for one; the optimised model runs without."""


def _parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C forward: nothing to read
        return {}


def prepare_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict, list[str]]:
    """(the graph's keyword inputs, the constant keywords the capture binds into the graph,
    the notes to report) for a call `model(*args, **kwargs)`.

    Turns the KV cache off where the forward takes `use_cache` (bound as use_cache=False,
    so the graph, its .pt2 and its ONNX file take only the user's inputs); drops a
    `return_dict` / `output_*` flag bound for `**kwargs` when it equals the config's own
    value; raises CacheError for a cache handed in or `use_cache=True` asked for."""
    params = _parameters(model)
    if "use_cache" not in params:
        return kwargs, {}, []
    name = type(model).__name__
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given = dict(kwargs)
    given.update({p.name: a for p, a in zip(positional, args)})
    for key in CACHE_NAMES:
        if given.get(key) is not None and not _empty_cache(given[key]):
            raise CacheError(
                f"{name} was called with a KV cache ({key}={type(given[key]).__name__}): the optimised model runs "
                f"without one (a cache is state the captured graph cannot carry); call it on the whole sequence "
                f"without {key}, or use opt.generate(...), which does that for every new token")
    if given.get("use_cache") is True:
        raise CacheError(
            f"{name} was called with use_cache=True: the optimised model runs without a KV cache and returns "
            "none; drop use_cache (or pass use_cache=False), or use opt.generate(...) to decode")
    out = {k: v for k, v in kwargs.items() if k not in CACHE_NAMES and k != "use_cache"}
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
    config = getattr(model, "config", None)
    for flag, attr in _CONFIG_FLAGS.items():
        if var_keyword and flag in out and flag not in params and out[flag] == getattr(config, attr, object()):
            del out[flag]
    notes = [CACHE_OFF_NOTE] if getattr(config, "use_cache", False) else []
    return out, {"use_cache": False}, notes


def _empty_cache(cache: Any) -> bool:
    """A cache object that holds nothing yet (what generate() builds before the first step)."""
    length = getattr(cache, "get_seq_length", None)
    try:
        return callable(length) and int(length()) == 0
    except Exception:  # noqa: BLE001 - a cache we cannot read is a cache we cannot take
        return False


def generate(optimized: nn.Module, model: nn.Module, args: tuple, kwargs: dict):
    """The original model's `generate()`, with the optimised forward in place of its own
    and the KV cache off (see the module docstring); the user's model is not changed."""
    if not callable(getattr(model, "generate", None)):
        raise AttributeError(f"{type(model).__name__} has no generate(): only models with a generation head "
                             "(e.g. a *ForCausalLM or *ForConditionalGeneration) decode")
    if kwargs.get("use_cache") is True:
        raise CacheError(f"{type(model).__name__}: opt.generate(use_cache=True) is not possible: the optimised model "
                         "runs without a KV cache; drop use_cache (each step re-runs the whole sequence)")
    view = copy.copy(model)  # the same parameters and submodules; only this view's forward is replaced
    view.forward = optimized.forward
    return view.generate(*args, **{**kwargs, "use_cache": False})
