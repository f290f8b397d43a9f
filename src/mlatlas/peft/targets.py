"""Which layers an adapter wraps: peft's module-name matching, and the names files carry.

peft chooses the layers to adapt by *module name* (Mangrulkar et al. 2022, the 🤗 PEFT
library; the matching rule of ``peft.tuners.tuners_utils.check_target_module_exists``):
``target_modules`` is either a list of names — a module is a target when its full dotted name
equals an entry or ends in ``"." + entry`` — or a single string, a regular expression that
the full name must match entirely (``re.fullmatch``). ``exclude_modules`` removes modules by
the same rule. The names are those of the model peft wraps: for our
:class:`~mlatlas.llm.llama.Llama` they are the Hugging Face names
(``model.layers.0.self_attn.q_proj``; :func:`mlatlas.llm.hf_format.hf_key_map`), so one
config or adapter file means the same layers on our Llama and on transformers'
``LlamaForCausalLM``. Any other ``nn.Module`` uses its own ``named_modules()`` names.

==================  ================================================================
``own name``        the name in ``model.named_modules()``
``public name``     the name peft would see (Hugging Face names for a :class:`Llama`)
``target``          one entry of ``target_modules`` (suffix) or the whole regex
==================  ================================================================
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from mlatlas.llm.hf_format import hf_key_map
from mlatlas.llm.llama import Llama

__all__ = ["Target", "check_target_modules", "find_targets", "public_name", "set_submodule"]

TargetModules = str | Sequence[str]


@dataclass(frozen=True)
class Target:
    """One module an adapter wraps.

    Attributes:
        name: Its own name in ``model.named_modules()``.
        public_name: The name peft and adapter files use for it.
        module: The module itself.
    """

    name: str
    public_name: str
    module: nn.Module


def check_target_modules(value: object, arg: str = "target_modules") -> TargetModules:
    """Validate a ``target_modules`` value: a regex string or a non-empty list of names.

    Raises:
        TypeError: neither a string nor a list/tuple/set of strings.
        ValueError: empty, or a string that is not a valid regular expression.
    """
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{arg} must be a non-empty regex or list of module names, got ''")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{arg} {value!r} is not a valid regular expression: {exc}") from exc
        return value
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
            isinstance(v, str) and v for v in value):
        raise TypeError(f"{arg} must be a regex string or a list of module names, got "
                        f"{value!r}")
    if not value:
        raise ValueError(f"{arg} must name at least one module, got an empty list")
    return sorted(set(value)) if isinstance(value, (set, frozenset)) else list(value)


def _llama_prefixes(model: Llama) -> dict[str, str]:
    """Top-level module of our Llama → its Hugging Face name (``layers`` → ``model.layers``)."""
    out = {"lm_head": "lm_head"}
    for ours, hf in hf_key_map(model.config).items():
        first = ours.split(".")[0]
        out[first] = hf[:len(hf) - len(ours) + len(first)]  # same tail, hf has a longer head
    return out


def public_name(model: nn.Module, name: str) -> str:
    """The name peft uses for the module ``name`` of ``model`` (see the module docstring)."""
    if not isinstance(model, Llama) or not name:
        return name
    first, _, rest = name.partition(".")
    head = _llama_prefixes(model).get(first, first)
    return f"{head}.{rest}" if rest else head


def _matches(target_modules: TargetModules, key: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return any(key == t or key.endswith("." + t) for t in target_modules)


def _closest(wanted: str, names: list[str]) -> list[str]:
    """Module names closest to ``wanted``: by last component, then by full name."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    near = difflib.get_close_matches(wanted.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.5)
    examples = [next(n for n in names if n.endswith("." + leaf) or n == leaf) for leaf in near]
    full = difflib.get_close_matches(wanted, names, n=3, cutoff=0.4)
    return list(dict.fromkeys(examples + full)) or names[:4]


def find_targets(model: nn.Module, target_modules: TargetModules,
                 kinds: tuple[type[nn.Module], ...], *,
                 exclude_modules: TargetModules | None = None,
                 skip_inside: tuple[type[nn.Module], ...] = ()) -> list[Target]:
    """The modules of ``model`` that ``target_modules`` selects, by peft's rule.

    Args:
        model: Any module (a :class:`Llama` is matched by its Hugging Face names).
        target_modules: Regex string (full match) or list of names (exact or ``.``-suffix).
        kinds: Module types that may be wrapped; a selected module of another type is an
            error.
        exclude_modules: Same rule; selected modules that also match it are left out.
        skip_inside: Wrapper types whose inner modules are never selected (an adapter is
            not applied to the layers of another adapter).

    Returns:
        The selected modules, in ``named_modules()`` order.

    Raises:
        ValueError: a list entry (or the regex) that selects no module — the message names the
            closest module names —, a selected module of a type not in ``kinds``, or nothing
            left after ``exclude_modules``.
    """
    target_modules = check_target_modules(target_modules)
    if exclude_modules is not None:
        exclude_modules = check_target_modules(exclude_modules, "exclude_modules")
    names, found, inside, selected = [], [], [], []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, skip_inside):
            inside.append(name)
        key = public_name(model, name)
        names.append(key)
        if not name or not _matches(target_modules, key):
            continue
        selected.append(key)
        if exclude_modules is not None and _matches(exclude_modules, key):
            continue
        if not isinstance(module, kinds):
            raise ValueError(f"target_modules selects {key!r}, a {type(module).__name__}; "
                             f"expected one of {[k.__name__ for k in kinds]}")
        found.append(Target(name, key, module))
    wanted = [target_modules] if isinstance(target_modules, str) else target_modules
    for entry in wanted:
        if not any(_matches(entry if isinstance(target_modules, str) else [entry], k)
                   for k in selected):
            raise ValueError(
                f"target_modules entry {entry!r} matches no module of {type(model).__name__} "
                "(expected a module name, a '.'-suffix of one, or a full-match regex); "
                f"closest module names: {_closest(entry, names[1:])}")
    if not found:
        raise ValueError(f"exclude_modules {exclude_modules!r} excludes every module "
                         f"target_modules selects ({selected[:4]}…)")
    return found


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted, own name) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
