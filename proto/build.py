"""Generate the gRPC stubs from proto/generate.proto into the `pytgi_proto` package.

One package shared by the router and the shards: both depend on the contract, not on each other,
and protobuf refuses two registrations of the same `generate.v3` symbols in one process (tests
run router and engine code together). protoc's `-I<virtual>=<physical>` mapping makes the
generated code import `pytgi_proto.generate_pb2` instead of a bare top-level `generate_pb2`, so
nothing is edited by hand.

`python proto/build.py` writes the stubs; `python proto/build.py --check` exits 1 when the stubs
in the tree differ from what the current .proto generates.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "generate.proto"
PACKAGES = ("pytgi_proto",)
GENERATED = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def generate(out_root: Path) -> None:
    from grpc_tools import protoc

    for package in PACKAGES:
        (out_root / package).mkdir(parents=True, exist_ok=True)
        args = [
            "protoc",
            f"-I{package}={PROTO.parent}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"{package}/{PROTO.name}",
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {package}")
        (out_root / package / "__init__.py").write_text('"""Generated gRPC stubs (proto/build.py)."""\n')


def drifted(tree_root: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            f"{package}/{name}"
            for package in PACKAGES
            for name in GENERATED
            if not (tree_root / package / name).exists()
            or not filecmp.cmp(Path(tmp) / package / name, tree_root / package / name, shallow=False)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs in the tree drifted")
    args = parser.parse_args()
    if args.check:
        stale = drifted(ROOT)
        if stale:
            sys.exit("stale gRPC stubs (run `python proto/build.py`): " + ", ".join(stale))
        print("gRPC stubs up to date")
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for package in PACKAGES:
            (ROOT / package).mkdir(exist_ok=True)
            for name in (*GENERATED, "__init__.py"):
                shutil.copyfile(Path(tmp) / package / name, ROOT / package / name)
    print(f"generated stubs in {', '.join(PACKAGES)}")


if __name__ == "__main__":
    main()
