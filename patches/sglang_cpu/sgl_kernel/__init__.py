"""Import stand-in for ``sgl_kernel`` on a machine without a GPU (see ``alp_megatron._patches.sglang``).

SGLang 0.5.23 imports names from ``sgl_kernel`` (and submodules such as ``sgl_kernel.kvcacheio``) at
module level whenever it runs on CPU, but the CPU build of that package is not on PyPI. Every name
here, at any depth, is an object that raises ``NotImplementedError`` when called, so imports succeed
and any kernel that is actually used fails loudly with its name. With ``--attention-backend
torch_native --sampling-backend pytorch`` a Llama/Qwen2 server calls none of them.

Only the SGLang server process sees this folder (it is put on that process's ``PYTHONPATH``).
"""

import importlib.abc
import importlib.machinery
import sys
import types

STAND_IN = True  # lets a test tell this package from the real one


class _MissingKernelType(type):
    """Metaclass of the stand-in names: attribute access yields more stand-ins, calls raise."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{cls.__qualname__} is not available: this is the CPU import stand-in, "
            "which has no kernels. Use --attention-backend torch_native --sampling-backend pytorch, "
            "or install a real sgl-kernel build for this device."
        )


def _missing(qualname):
    name = qualname.rsplit(".", 1)[-1]
    return _MissingKernelType(name, (), {"__qualname__": qualname, "__module__": __name__})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        prefix = self.__name__[len(__name__) + 1 :]
        value = _missing(f"{prefix}.{name}" if prefix else name)
        setattr(self, name, value)
        return value


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``sgl_kernel.<anything>`` import resolve to a stand-in module."""

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
