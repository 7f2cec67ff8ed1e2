"""Build hook: compile the gRPC API into ``mofserve.v1`` when a wheel is built (``pip install .``).

Everything else about the distribution is in pyproject.toml. An editable install
(``pip install -e .``, ``make install``) compiles into the checkout instead: ``make install`` runs
``python -m mofserve.protogen`` and ``import mofserve.v1`` recompiles whenever the .proto is
newer than the stubs. The compiler is ``mofserve/protogen.py``, loaded from its file because
``mofserve`` is not installed yet while it builds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _protogen():
    spec = importlib.util.spec_from_file_location("_mofserve_protogen", HERE / "mofserve" / "protogen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """``build_py`` that also writes ``mofserve/v1/mofserve_pb2{,_grpc}.py{,i}`` into the build."""

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            protogen = _protogen()
            self._protos = protogen.generate(Path(self.build_lib), root=HERE / "server" / "protos")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *(str(p) for p in getattr(self, "_protos", []))]


setup(cmdclass={"build_py": BuildPyWithProtos})
