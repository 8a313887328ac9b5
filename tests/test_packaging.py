"""The built wheel: our kernels install as `dsv3_kernels` (never the bare `kernels`, which is a
Hugging Face package that transformers imports) and the data files travel with the code."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout_and_imports(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("dsv3-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dsv3_kernels/fp8.py" in names
    assert {"dsv3_kernels/cpu_fp8.c", "dsv3_kernels/cpu_gemm.c"} <= set(names)  # compiled on first use by dsv3_kernels.cpu
    assert not any(n.startswith("kernels/") for n in names)
    for data in ("dsv3cli/presets/deepseek-v3.json", "dsv3cli/presets/tiny.json", "dsv3cli/data/gpus.json"):
        assert data in names, data
    # Import from the wheel alone (pure Python, so zip-importable), away from the source tree.
    code = (
        "import importlib.util, dsv3cli, dsv3_kernels, dsv3cli.config as c;"
        "assert dsv3cli.__file__.startswith(%r), dsv3cli.__file__;"
        "assert dsv3_kernels.__file__.startswith(%r);"
        "assert c.load_preset('deepseek-v3').hidden_size == 7168;"
        "assert 'deepseek-v3' in c.preset_names();"
        "import shutil, dsv3_kernels.cpu as k;"  # the C source is read from inside the wheel
        "assert k.load() is not None or shutil.which('cc') is None" % (str(wheel), str(wheel))
    )
    env = {"PYTHONPATH": str(wheel), "PATH": "/usr/bin:/bin", "DSV3_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


def test_triton_only_in_the_test_extra():
    """Triton (~1 GB) serves CUDA only, where torch's CUDA builds bring it: a CPU install skips it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["test"])
