"""Objects named in the config by a Python path, ``"package.module:attribute"`` (custom rewards, tools, turn
formats): found, or refused with a :class:`ConfigError` on the config field that names what is wrong."""

from __future__ import annotations

import importlib
from typing import Any, Iterable

from alp_megatron.errors import ConfigError


def import_object(spec: str, field: str, kind: str, builtins: Iterable[str]) -> Any:
    """The attribute ``spec`` = "package.module:attribute" names (``attribute`` may be dotted). ``kind`` and
    ``builtins`` (the names the caller resolves itself) word the error when ``spec`` is neither."""
    module_name, attr_path = _split_path(spec, field, kind, builtins)
    target: Any = _import_module(module_name, spec, field)
    walked = module_name
    for part in attr_path.split("."):
        if not hasattr(target, part):
            available = sorted(n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n)))
            shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
            raise ConfigError(
                field,
                f"{walked!r} has no attribute {part!r} (looking up {spec!r}); its public callables are: "
                f"{shown or 'none'}",
                "check the name after the ':'",
            )
        target = getattr(target, part)
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    return target


def _split_path(spec: str, field: str, kind: str, builtins: Iterable[str]) -> tuple[str, str]:
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip() or ":" in attr_path:
        raise ConfigError(
            field,
            f"{spec!r} is neither a built-in {kind} ({', '.join(sorted(builtins))}) "
            "nor a Python path of the form 'package.module:function'",
            "use one of the built-in names, or 'package.module:function' naming a function importable here",
        )
    return module_name.strip(), attr_path.strip()


def _import_module(module_name: str, spec: str, field: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise ConfigError(
                field,
                f"module {module_name!r} of {spec!r} was not found (no module named {error.name!r})",
                "check the spelling, install the package that holds it, or add its folder to PYTHONPATH",
            ) from error
        raise ConfigError(
            field,
            f"module {module_name!r} of {spec!r} was found but importing it failed: it imports "
            f"{error.name!r}, which is not installed",
            f"install the package that provides {error.name!r}",
        ) from error
    except Exception as error:
        raise ConfigError(
            field,
            f"importing module {module_name!r} of {spec!r} raised {type(error).__name__}: {error}",
            "fix the error in that module (import it in a Python shell to see the traceback)",
        ) from error
