"""Build and install hifuse with its native ops.

The native library (hifuse_kernels/_C*.so) is built by CMakeLists.txt. Settings,
all optional, come from the environment:

  HIFUSE_NO_EXTENSION=1   install the Python package only (native ops unavailable)
  HIFUSE_NO_CUDA=1        build the CPU ops only
  HIFUSE_REQUIRE_CUDA=1   fail instead of falling back to CPU-only when no CUDA toolkit is found
  HIFUSE_CUDA_ARCHS       CUDA architectures, CMake syntax ("80;90", "90a");
                          TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") is read when unset.
                          Default: the local GPUs' archs, else "80;90".
  CUDA_HOME               CUDA toolkit folder (found from nvcc on PATH when unset)
  MAX_JOBS                parallel compile jobs
  CMAKE_BUILD_TYPE        Release (default) or Debug
  HIFUSE_BUILD_DIR        CMake build folder (default build/cmake-<python>-torch<version>, kept
                          between installs so an unchanged tree rebuilds in seconds; delete it,
                          or set HIFUSE_CLEAN_BUILD=1, for a build from nothing)

The library is built against the torch of the environment it is installed into, also under
pip's build isolation (which hides that environment from this script): a library built
against another torch would not load. torch must therefore be installed first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"hifuse build: {msg}", file=sys.stderr, flush=True)


def find_cuda_home() -> Path | None:
    """The toolkit root: $CUDA_HOME, else what nvcc on PATH reports (it may be a wrapper)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return Path(match.group(1).strip()).resolve() if match else Path(nvcc).resolve().parent.parent


TORCH_QUERY = (
    "import json, os, torch; print(json.dumps(dict(dir=os.path.dirname(torch.__file__), "
    "version=torch.__version__, cuda=torch.version.cuda or '', abi=int(torch._C._GLIBCXX_USE_CXX11_ABI))))"
)
INSTALL_TORCH_FIRST = (
    "hifuse builds its native ops against the torch of the environment it installs into, and "
    "found none there: install torch first (`pip install torch`), then `pip install .`"
)


def target_torch() -> dict:
    """The torch of the environment being installed into: this interpreter run without the
    PYTHONPATH overlay by which pip's isolated builds hide that environment's packages."""
    hidden = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")
    clean = {k: v for k, v in os.environ.items() if k not in hidden}
    for env in (clean, dict(os.environ)):
        out = subprocess.run([sys.executable, "-c", TORCH_QUERY], capture_output=True, text=True, env=env)
        if out.returncode == 0:
            return json.loads(out.stdout.strip().splitlines()[-1])
    raise RuntimeError(INSTALL_TORCH_FIRST)


def cuda_archs() -> str:
    archs = os.environ.get("HIFUSE_CUDA_ARCHS")
    if archs:
        return archs
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if torch_list:
        out = []
        for item in re.split(r"[;\s,]+", torch_list.strip()):
            if not item:
                continue
            ptx = item.endswith("+PTX")
            num = item.replace("+PTX", "").replace(".", "")
            out.append(num if ptx else f"{num}-real")
        return ";".join(out)
    code = (
        "import torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
        "print(';'.join(sorted({'%d%d' % torch.cuda.get_device_capability(i) for i in range(n)})))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    local = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    return local or "80;90"


def build_dir(torch_info: dict) -> Path:
    """A build folder kept between installs, one per Python and torch (CMake's incremental
    build then recompiles only what changed)."""
    if os.environ.get("HIFUSE_BUILD_DIR"):
        return Path(os.environ["HIFUSE_BUILD_DIR"]).resolve()
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", torch_info["version"])
    return ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}-torch{tag}"


def stale_tools(folder: Path) -> bool:
    """Whether the CMake cache in ``folder`` names a cmake or ninja that is gone (pip's isolated
    builds run tools from a temporary environment); such a folder cannot be reused."""
    cache = folder / "CMakeCache.txt"
    if not cache.exists():
        return False
    for line in cache.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.split(":")[0] in ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM") and value and not Path(value).exists():
            _log(f"{folder.name} was configured with {value}, which is gone: building from nothing")
            return True
    return False


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch_info = target_torch()
        _log(f"building against torch {torch_info['version']} at {torch_info['dir']}")
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        folder = build_dir(torch_info)
        if folder.exists() and (_flag("HIFUSE_CLEAN_BUILD") or stale_tools(folder)):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)

        use_cuda = not _flag("HIFUSE_NO_CUDA") and bool(torch_info["cuda"])
        cuda_home = find_cuda_home() if use_cuda else None
        if use_cuda and (cuda_home is None or not (cuda_home / "bin" / "nvcc").exists()):
            _log("no CUDA toolkit found (set CUDA_HOME): building the CPU ops only")
            use_cuda = False
        if _flag("HIFUSE_REQUIRE_CUDA") and not use_cuda:
            raise RuntimeError(
                "HIFUSE_REQUIRE_CUDA=1 but the CUDA ops cannot be built: "
                + (
                    "HIFUSE_NO_CUDA is set" if _flag("HIFUSE_NO_CUDA")
                    else "torch is a CPU build" if not torch_info["cuda"]
                    else "no CUDA toolkit (set CUDA_HOME)"
                )
            )
        args = [
            f"-DHIFUSE_PYTHON={sys.executable}",
            f"-DHIFUSE_TORCH_DIR={torch_info['dir']}",
            f"-DHIFUSE_TORCH_CXX11_ABI={torch_info['abi']}",
            f"-DHIFUSE_TORCH_CUDA={torch_info['cuda']}",
            f"-DHIFUSE_OUTPUT_FILE={target.name}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DHIFUSE_CUDA={'ON' if use_cuda else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        env = dict(os.environ)
        if use_cuda:
            archs = cuda_archs()
            args += [f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}", f"-DHIFUSE_CUDA_ARCHS={archs}"]
            env["CUDA_HOME"] = str(cuda_home)
            env["CUDAToolkit_ROOT"] = str(cuda_home)
            _log(f"CUDA ops for archs {archs} with the toolkit at {cuda_home}")
        else:
            _log("CPU ops only")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(folder), *args], check=True, env=env)
        subprocess.run(["cmake", "--build", str(folder), "--parallel", jobs], check=True, env=env)
        # The torch it was built against: the package refuses to load it under another one.
        info = json.dumps({"torch": torch_info["version"], "cuda": use_cuda}) + "\n"
        target.with_name("_C.build.json").write_text(info)
        if self.inplace or getattr(self, "editable_mode", False):
            # an editable install loads the library from the source tree, where setuptools
            # copies only the library itself
            (ROOT / "hifuse_kernels" / "_C.build.json").write_text(info)


ext_modules = [] if _flag("HIFUSE_NO_EXTENSION") else [Extension("hifuse_kernels._C", sources=[])]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
