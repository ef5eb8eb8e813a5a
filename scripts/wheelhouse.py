"""Gather wheels for an offline GPU node: every package the project's lock installs, except torch, in one folder.

    python scripts/wheelhouse.py                          # -> wheelhouse/, for this machine's Python
    python scripts/wheelhouse.py --python-version 3.12    # for a node with another Python (CPython, manylinux x86_64)
    python scripts/wheelhouse.py --only peft hydra-core   # just these packages and what they need

Run on a networked machine with the project installed (`make install`): the versions are the ones installed in this
environment, i.e. the lock (requirements.txt) and what it resolved to, which CI tests. The closure is read from the
installed packages' metadata and stops at torch, so the node's own CUDA build of torch (and what it brought, such
as nvidia-* and triton) is kept. A package published only as source (e.g. antlr4-python3-runtime, deepspeed) is
built here into a pure-Python wheel. wheelhouse/requirements.txt pins every package in the folder; on the node, in
the checkout:

    python -m pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt

pip installs exactly the tested versions (replacing older transformers, accelerate, peft, ... that the node has) and
leaves the node's torch as it is.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
KEPT_ON_NODE = {"torch"}  # the node's CUDA build stays; the walk does not enter it
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PLATFORMS += ("manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64")
PLATFORMS += tuple(f"manylinux_2_{n}_x86_64" for n in (24, 31, 34, 35, 39))


def locked_roots(requirements: Path) -> list[str]:
    """The package names that requirements.txt pins, torch excluded."""
    names = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = canonicalize_name(Requirement(line).name)
            if name not in KEPT_ON_NODE:
                names.append(name)
    return names


def closure(roots: list[str], python_version: str) -> dict[str, str]:
    """name -> installed version for the roots and everything they require (markers evaluated for the node's
    Python), not entering torch. A root or requirement missing from this environment stops with its name."""
    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0", extra="")
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or name in KEPT_ON_NODE:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {name} is not installed here; run `make install` first") from None
        for spec in metadata.requires(name) or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate(env):
                todo.append(requirement.name)
    return dict(sorted(found.items()))


def fetch(name: str, version: str, dest: Path, python_version: str) -> str:
    """Download the node's wheel of name==version, or build a wheel here from its source release; returns how."""
    abi = "cp" + python_version.replace(".", "")
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    download += ["--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3"]
    download += ["--abi", "none", *platforms, f"{name}=={version}"]
    if subprocess.run(download, capture_output=True, text=True).returncode == 0:
        return "downloaded"
    # no wheel for the node: build one from the source release (pure Python only; --no-build-isolation lets a
    # package that imports torch at build time, such as deepspeed, see this environment's)
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dest)]
    result = subprocess.run([*build, f"{name}=={version}"], capture_output=True, text=True)
    if result.returncode:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: no wheel of {name}=={version} for Python {python_version}: {reason}")
    built = sorted(dest.glob(f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"), key=lambda p: p.stat().st_mtime)
    if built and not built[-1].name.endswith("-none-any.whl"):
        raise SystemExit(f"error: {built[-1].name} was built for this machine, not the node; build it on the node")
    return "built"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / "wheelhouse")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser.add_argument("--python-version", default=here, help=f"the node's Python, X.Y (default {here})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these packages and what they need (default: all)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version {args.python_version!r}: give the node's CPython as X.Y, e.g. 3.12")
    roots = [canonicalize_name(n) for n in args.only] if args.only else locked_roots(REPO_ROOT / "requirements.txt")
    if KEPT_ON_NODE & set(roots):
        parser.error("--only torch: the node keeps its own torch; the wheelhouse never holds it")
    packages = closure(roots, args.python_version)
    args.dest.mkdir(parents=True, exist_ok=True)
    for name, version in packages.items():
        print(f"{fetch(name, version, args.dest, args.python_version):>10} {name}=={version}", flush=True)
    pins = "".join(f"{name}=={version}\n" for name, version in packages.items())
    (args.dest / "requirements.txt").write_text(
        f"# every package of this wheelhouse (scripts/wheelhouse.py, Python {args.python_version}, roots: "
        f"{' '.join(roots)}); torch is the node's\n" + pins
    )
    size = sum(p.stat().st_size for p in args.dest.glob("*.whl")) / 2**20
    print(f"{len(packages)} packages, {size:.0f} MiB in {args.dest}; on the node, in the checkout:")
    print(f"  python -m pip install --no-index --find-links {args.dest.name} -r {args.dest.name}/requirements.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
