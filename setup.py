"""The compiled pieces of the proxy: its per-row loops (proxy/pgwarden_proxy/wire/_rowwalk.c)
and the fast path of prepared statements' executions (wire/_fastpath.c).

Everything else is in pyproject.toml. Both extensions are optional: where no C compiler is
found the build still succeeds and the proxy uses its Python code, which gives the same bytes
and events (tests/unit/test_rowwalk.py, test_framing.py and test_fastpath.py compare them),
only slower.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension(
            f"pgwarden_proxy.wire.{name}",
            [f"proxy/pgwarden_proxy/wire/{name}.c"],
            optional=True,
            extra_compile_args=_FLAGS,
        )
        for name in ("_rowwalk", "_fastpath")
    ]
)
