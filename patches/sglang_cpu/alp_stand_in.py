"""Shared machinery of the CPU import stand-ins (``sgl_kernel/``, ``torchvision/``) in this folder.

:func:`make_stand_in` turns a package into one whose every name, at any depth and in any submodule, is a
class-like object: it can be imported, subclassed, annotated with and read from, and raises
``NotImplementedError`` with the package's own explanation when called. Only SGLang server processes on a
machine without a GPU see this folder (it is put on their ``PYTHONPATH``).
"""

import importlib.abc
import importlib.machinery
import sys
import types


def make_stand_in(package: str, unavailable: str) -> None:
    """Make the already-imported ``package`` a stand-in; calling any of its names raises
    ``NotImplementedError("<package>.<name> is not available: <unavailable>")``."""

    class AbsentType(type):
        """Metaclass of the stand-in names: attribute access yields more stand-ins, calls raise."""

        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return absent(f"{cls.__qualname__}.{name}")

        def __call__(cls, *args, **kwargs):
            raise NotImplementedError(f"{package}.{cls.__qualname__} is not available: {unavailable}")

    def absent(qualname):
        name = qualname.rsplit(".", 1)[-1]
        return AbsentType(name, (), {"__qualname__": qualname, "__module__": package})

    class StandInModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            prefix = self.__name__[len(package) + 1 :]
            value = absent(f"{prefix}.{name}" if prefix else name)
            setattr(self, name, value)
            return value

    class SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """Makes every ``<package>.<anything>`` import resolve to a stand-in module."""

        def find_spec(self, fullname, path=None, target=None):
            if fullname.startswith(package + "."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StandInModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.append(SubmoduleFinder())
    sys.modules[package].__class__ = StandInModule
