import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from tests.sglang_fixtures import moe_model_path, moe_server  # noqa: E402,F401  (session-scoped servers)
