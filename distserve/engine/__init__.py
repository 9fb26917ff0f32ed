"""The CPU reference engine: a small torch LLM on the LMDeploy DistServe wire protocol.

Importing this package (and `distserve.engine.cli`, the server and null mode) never imports torch or
dlslime; only the real model path (`distserve.engine.torch_backend`) does.
"""
