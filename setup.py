"""The one compiled piece: the proxy's per-row loops (proxy/pgwarden_proxy/wire/_rowwalk.c).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is found
the build still succeeds and the proxy uses the pure-Python loops, which give the same bytes
(tests/unit/test_rowwalk.py and test_framing.py compare them), only slower on large results.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pgwarden_proxy.wire._rowwalk",
            ["proxy/pgwarden_proxy/wire/_rowwalk.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        )
    ]
)
