"""The one compiled piece: the masking row walk (proxy/pgwarden_proxy/masking/_rowwalk.c).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is found
the build still succeeds and the proxy uses the pure-Python walk, which gives the same bytes
(tests/unit/test_rowwalk.py compares the two), only slower on masked results.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pgwarden_proxy.masking._rowwalk",
            ["proxy/pgwarden_proxy/masking/_rowwalk.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
        )
    ]
)
