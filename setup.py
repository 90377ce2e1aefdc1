"""The compiled pieces of the proxy: its per-row loops (proxy/pgwarden_proxy/wire/_rowwalk.c),
the fast path of prepared statements' executions (wire/_fastpath.c) and the statement log line
(_eventline.c).

Everything else is in pyproject.toml. The extensions are optional: where no C compiler is found
the build still succeeds and the proxy uses its Python code, which gives the same bytes, events
and lines (tests/unit/test_rowwalk.py, test_framing.py, test_fastpath.py and test_events_logs.py
compare them), only slower.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension(
            f"pgwarden_proxy.{name.replace('/', '.')}",
            [f"proxy/pgwarden_proxy/{name}.c"],
            optional=True,
            extra_compile_args=_FLAGS,
        )
        for name in ("wire/_rowwalk", "wire/_fastpath", "_eventline")
    ]
)
