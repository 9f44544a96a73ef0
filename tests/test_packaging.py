"""The client and the protocol need no MLX: a plugin or tool can install them alone."""

from __future__ import annotations

import subprocess
import sys

BLOCK_MLX = """
import sys
class BlockMLX:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlx", "mlx_lm"):
            raise ImportError(f"MLX is absent in this test ({name})")
sys.meta_path.insert(0, BlockMLX())
"""


def test_client_and_protocol_import_without_mlx() -> None:
    code = BLOCK_MLX + (
        "import mlxd.protocol, mlxd.client\n"
        "from mlxd.client import AsyncClient, Client\n"
        "assert not any(m.split('.')[0] in ('mlx', 'mlx_lm') for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_blocker_really_blocks_mlx() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_MLX + "import mlx.core"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "MLX is absent" in out.stderr
