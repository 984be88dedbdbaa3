"""P9 (patches/megatron_core.py): a checkpoint whose optimizer has the log_sigma group loads again.

Before megatron-core 0.19 the optimizer matched param groups on load by keys the log_sigma group shares
with the default group; loading failed. P9 is applied on every machine where it covers the version.
"""

from importlib.metadata import version as installed_version

import pytest
from packaging.version import Version

from alp_megatron._patches.megatron_core import FIXES
from tests.distributed import run_ranks
from tests.model.layouts import ALP
from tests.patches.fix_probes import save_and_load_with_sigma_group

pytestmark = pytest.mark.megatron
P9_COVERS = FIXES[0].covers(Version(installed_version("megatron-core")))


def test_sigma_group_checkpoint_loads_with_p9(tmp_path):
    report = run_ranks(1, save_and_load_with_sigma_group, str(tmp_path), True)[0]
    assert report["fixes"] == (("P9",) if P9_COVERS else ())
    sigma_groups = [g for g in report["groups"] if g[1] == ALP.sigma_lr]
    assert sigma_groups and sigma_groups[0][0] == 4  # one log_sigma per layer, in its own group


@pytest.mark.skipif(not P9_COVERS, reason="megatron-core >= 0.19 tells the groups apart itself")
def test_without_p9_the_load_fails(tmp_path):
    with pytest.raises(RuntimeError, match="parameter group that doesn't match the size"):
        run_ranks(1, save_and_load_with_sigma_group, str(tmp_path), False)
