"""The compiled parts of the router: its HTTP/1.1 head parsers (distserve/router/_heads.c), kv_aware's shortlist
scoring (_shortlist.c) and the rings' operations (_ring_ops.c).

Optional: where no C compiler or Python headers are at hand the build goes on without them, and the router uses
the same functions in Python (distserve/router/heads.py, shortlist.py, ring_ops.py: their specifications).
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "distserve.router._heads",
            sources=["distserve/router/_heads.c"],
            optional=True,
            extra_compile_args=_FLAGS,
        ),
        Extension(
            "distserve.router._shortlist",
            sources=["distserve/router/_shortlist.c"],
            optional=True,
            # no fused multiply-add: a cost must round as Python's two products and difference do
            extra_compile_args=[*_FLAGS, "-ffp-contract=off"],
        ),
        Extension(
            "distserve.router._ring_ops",
            sources=["distserve/router/_ring_ops.c"],
            optional=True,
            extra_compile_args=_FLAGS,
        ),
    ]
)
