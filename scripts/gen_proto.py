"""Regenerate the Python stubs in pagoda/v1 from proto/pagoda/v1/*.proto.

The one way stubs are made: grpcio-tools at the exact version pinned in
pyproject.toml (the generated files embed it). `--check` compares instead of
writing and exits 1 when the committed stubs are stale.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = ROOT / "pagoda" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc into out_root (which mirrors the repository root); return the files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "pagoda/v1").glob("*.proto")
    )
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "pagoda" / "v1").glob("*_pb2*.py*"))


def committed() -> list[Path]:
    return sorted(p for p in OUT_PACKAGE.iterdir() if p.name.endswith(SUFFIXES))


def check() -> int:
    """Exit status 0 when pagoda/v1 holds exactly what generate() makes."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    have = {p.name: p.read_text() for p in committed()}
    stale = sorted(set(fresh) ^ set(have))
    stale += sorted(n for n in set(fresh) & set(have) if fresh[n] != have[n])
    for name in stale:
        diff = difflib.unified_diff(
            have.get(name, "").splitlines(),
            fresh.get(name, "").splitlines(),
            f"committed/{name}",
            f"generated/{name}",
            lineterm="",
            n=1,
        )
        print("\n".join(list(diff)[:40]), file=sys.stderr)
    if stale:
        print(f"stale stubs: {', '.join(stale)}; run python scripts/gen_proto.py", file=sys.stderr)
    return 1 if stale else 0


def write() -> None:
    for old in committed():
        old.unlink()
    generated = generate(ROOT)
    print("\n".join(str(p.relative_to(ROOT)) for p in generated))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when committed stubs are stale")
    if parser.parse_args().check:
        raise SystemExit(check())
    write()


if __name__ == "__main__":
    main()
