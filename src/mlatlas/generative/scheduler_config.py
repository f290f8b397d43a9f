"""Scheduler configs the diffusers way: a frozen ``config``, ``from_config``, ``scheduler_config.json``.

A diffusers pipeline never builds its scheduler from arguments: it reads
``pipe.scheduler.config`` (a read-only mapping of the constructor's arguments, also readable as
attributes), builds a new scheduler with ``SomeScheduler.from_config(config)`` (keys the class
does not take are ignored, so a DDPM config builds a DDIM scheduler) and saves or loads
``scheduler_config.json``. :class:`SchedulerConfigMixin` gives every scheduler of
:mod:`mlatlas.generative` that interface, recording the constructor's arguments as diffusers'
``ConfigMixin`` records them, so configs move both ways between our schedulers and diffusers'.

=========================  ==============================================================
``config``                 :class:`FrozenConfig` of every ``__init__`` argument (defaults too)
``_use_default_values``    names whose default was taken (dropped by ``from_config``, so the
                           target class applies its own default, as diffusers does)
``_class_name``            the class that wrote ``scheduler_config.json``
=========================  ==============================================================
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CONFIG_NAME", "FrozenConfig", "SchedulerConfigMixin"]

CONFIG_NAME = "scheduler_config.json"


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (``config.num_train_timesteps``).

    Raises:
        TypeError: on any mutation (item or attribute assignment, ``pop``, ``update``, …).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; keys: {sorted(self)}") from None

    def _frozen(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a scheduler config is frozen: build a new scheduler with "
                        "SomeScheduler.from_config(config, key=value) instead")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _frozen
    pop = popitem = clear = update = setdefault = _frozen

    def __reduce__(self) -> tuple[type, tuple[dict]]:
        return (FrozenConfig, (dict(self),))


def _json_value(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    return value


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return {k: p for k, p in params.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def _recording(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``__init__`` so the outermost call stores its bound arguments as ``config``."""

    @functools.wraps(init)
    def wrapper(self: SchedulerConfigMixin, *args: object, **kwargs: object) -> None:
        if "_internal_dict" not in self.__dict__:
            bound = inspect.signature(init).bind(self, *args, **kwargs)
            given = set(bound.arguments) - {"self"}
            bound.apply_defaults()
            values = {k: v for k, v in bound.arguments.items() if k != "self"}
            defaults = sorted(set(values) - given)
            if defaults:
                values["_use_default_values"] = defaults
            self._internal_dict = FrozenConfig(values)
        init(self, *args, **kwargs)

    return wrapper


class SchedulerConfigMixin:
    """``config`` / ``from_config`` / ``save_pretrained`` / ``from_pretrained`` for a scheduler.

    Subclasses only define ``__init__``; its arguments (positional or keyword, defaults
    included) become :attr:`config`. Class attribute ``order = 1``: one network call per step.
    """

    config_name = CONFIG_NAME
    order = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__dict__["__init__"])

    @property
    def config(self) -> FrozenConfig:
        """The constructor's arguments, read-only (attribute or item access)."""
        return self._internal_dict

    def register_to_config(self, **kwargs: Any) -> None:
        """Add or replace config entries (what diffusers' pipelines call to patch a config)."""
        self._internal_dict = FrozenConfig({**self._internal_dict, **kwargs})

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None,
                    return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """Build this scheduler from another scheduler's ``config`` (ours or diffusers').

        Keys this class does not take are ignored (returned with ``return_unused_kwargs``) and
        kept in the new config, as diffusers keeps them; keys listed in
        ``_use_default_values`` fall back to this class's defaults; ``kwargs`` override.

        Raises:
            TypeError: when ``config`` is not a mapping (pass a folder to
                :meth:`from_pretrained` instead).
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping such as scheduler.config, got "
                            f"{type(config).__name__}; use from_pretrained(folder) for a folder")
        defaulted = set(config.get("_use_default_values", ()))
        source = {k: v for k, v in config.items() if k not in defaulted}
        params = _init_parameters(cls)
        init = {k: source[k] for k in params if k in source and not k.startswith("_")}
        init.update({k: kwargs.pop(k) for k in list(kwargs) if k in params})
        hidden = {k: v for k, v in source.items()
                  if k not in init and k != "_use_default_values" and k not in params}
        scheduler = cls(**init)
        if hidden:
            hidden.pop("_class_name", None)
            scheduler.register_to_config(**hidden)
        if return_unused_kwargs:
            unused = {k: v for k, v in {**hidden, **kwargs}.items() if not k.startswith("_")}
            return scheduler, unused
        return scheduler

    def save_config(self, save_directory: str | os.PathLike, **kwargs: Any) -> str:
        """Write ``scheduler_config.json`` (diffusers' layout) into ``save_directory``.

        Returns:
            The path of the written file.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported: this library writes local folders only")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder, got the file {save_directory!r}")
        os.makedirs(save_directory, exist_ok=True)
        values = {k: _json_value(v) for k, v in self.config.items() if k != "_use_default_values"}
        values["_class_name"] = type(self).__name__
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(values, indent=2, sort_keys=True) + "\n")
        return path

    save_pretrained = save_config

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike,
                    subfolder: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Read ``scheduler_config.json`` from a local folder (or the file itself).

        Raises:
            FileNotFoundError: no such file (no downloads: pass a local folder).
        """
        path = Path(pretrained_model_name_or_path)
        if subfolder:
            path = path / subfolder
        if path.is_dir():
            path = path / cls.config_name
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_model_name_or_path must be a local folder with "
                                    f"{cls.config_name}; {str(path)!r} does not exist (no "
                                    "downloads: fetch the folder first)")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        subfolder: str | None = None, **kwargs: Any) -> Any:
        """Build the scheduler from a folder's ``scheduler_config.json`` (``kwargs`` override)."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder),
                               **kwargs)
