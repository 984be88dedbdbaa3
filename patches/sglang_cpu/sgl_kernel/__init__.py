"""Import stand-in for ``sgl_kernel`` on a machine without a GPU (see ``alp_megatron._patches.sglang``).

SGLang 0.5.23 imports names from ``sgl_kernel`` (and submodules such as ``sgl_kernel.kvcacheio``) at
module level whenever it runs on CPU, but the CPU build of that package is not on PyPI. Every name
here, at any depth, is an object that raises ``NotImplementedError`` when called, so imports succeed
and any kernel that is actually used fails loudly with its name. With ``--attention-backend
torch_native --sampling-backend pytorch`` a Llama/Qwen2 server calls none of them.

Only the SGLang server process sees this folder (it is put on that process's ``PYTHONPATH``).
"""

from alp_stand_in import make_stand_in

STAND_IN = True  # lets a test tell this package from the real one

make_stand_in(
    __name__,
    "this is the CPU import stand-in, which has no kernels. Use --attention-backend torch_native "
    "--sampling-backend pytorch, or install a real sgl-kernel build for this device."
)
