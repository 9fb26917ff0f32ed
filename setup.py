"""The one compiled part: the router's HTTP/1.1 head parsers (distserve/router/_heads.c).

Optional: where no C compiler or Python headers are at hand the build goes on without it, and the router uses
the same parsers in Python (distserve/router/heads.py). Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "distserve.router._heads",
            sources=["distserve/router/_heads.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
