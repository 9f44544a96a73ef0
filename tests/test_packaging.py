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


def test_the_trained_demo_model_is_package_data() -> None:
    import fnmatch
    from pathlib import Path

    from mlxd.daemon.demo_model import TRAINED_DIR

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["mlxd.daemon"]
    names = sorted(p.name for p in TRAINED_DIR.iterdir() if p.is_file())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        relative = f"{TRAINED_DIR.name}/{name}"
        assert any(fnmatch.fnmatch(relative, pat) for pat in patterns), relative
