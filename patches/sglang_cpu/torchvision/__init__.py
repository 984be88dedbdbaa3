"""Import stand-in for ``torchvision`` beside the CPU build of torch (see ``alp_megatron._patches.sglang``).

SGLang 0.5.23 imports ``torchvision.transforms`` at module level for its multimodal models, including
on the path that loads text-only models. PyPI's torchvision for x86_64 is built against CUDA torch and
fails to import beside ``torch+cpu`` (``operator torchvision::nms does not exist``). Every
``torchvision.*`` import succeeds here; every name is a class-like object that can be subclassed,
annotated with and read from, and that raises ``NotImplementedError`` when called. Image and video
processing is therefore unavailable; text-only models never reach it.

Only the SGLang server process sees this folder (it is put on that process's ``PYTHONPATH``).
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+alp.stand.in"
STAND_IN = True  # lets a test tell this package from the real one


class _AbsentType(type):
    """Metaclass of the stand-in names: attribute access yields more stand-ins, calls raise."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _absent(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise NotImplementedError(
            f"torchvision.{cls.__qualname__} is not available: this is the import stand-in used beside "
            "CPU torch, which serves text-only models. Install a torchvision built for the installed torch "
            "to serve image models."
        )


def _absent(qualname):
    name = qualname.rsplit(".", 1)[-1]
    return _AbsentType(name, (), {"__qualname__": qualname, "__module__": __name__})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        prefix = self.__name__[len(__name__) + 1 :]
        value = _absent(f"{prefix}.{name}" if prefix else name)
        setattr(self, name, value)
        return value


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``torchvision.<anything>`` import resolve to a stand-in module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_SubmoduleFinder())
sys.modules[__name__].__class__ = _StandInModule
