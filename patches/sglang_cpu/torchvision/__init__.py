"""Import stand-in for ``torchvision`` beside the CPU build of torch (see ``alp_megatron._patches.sglang``).

SGLang 0.5.23 imports ``torchvision.transforms`` at module level for its multimodal models, including
on the path that loads text-only models. PyPI's torchvision for x86_64 is built against CUDA torch and
fails to import beside ``torch+cpu`` (``operator torchvision::nms does not exist``). Every
``torchvision.*`` import succeeds here; every name is a class-like object that can be subclassed,
annotated with and read from, and that raises ``NotImplementedError`` when called. Image and video
processing is therefore unavailable; text-only models never reach it.

Only the SGLang server process sees this folder (it is put on that process's ``PYTHONPATH``).
"""

from alp_stand_in import make_stand_in

STAND_IN = True  # lets a test tell this package from the real one
__version__ = "0.0.0+alp.stand.in"

make_stand_in(
    __name__,
    "this is the import stand-in used beside CPU torch, which serves text-only models. Install a "
    "torchvision built for the installed torch to serve image models."
)
