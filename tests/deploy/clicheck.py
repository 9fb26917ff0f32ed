"""Check that a command line written in deploy/ or docs/ is accepted by the real CLI it names.

`distserve <sub> ...` and `distserve-ctl ...` are parsed with our own argparse parsers (the modules'
`add_arguments` / `build_parser`), so a renamed or removed flag fails here. `lmdeploy serve api_server`
lines are checked against the flags and choices of lmdeploy 0.18.0's CLI, recorded below (lmdeploy itself
cannot be installed next to our torch; the list was read from its `lmdeploy/cli/serve.py` parser).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import shlex

# lmdeploy 0.18.0 `lmdeploy serve api_server --help`: every long option.
LMDEPLOY_API_SERVER_FLAGS = frozenset("""
--adapters --allow-credentials --allow-headers --allow-methods --allow-origins --allow-terminate-by-client
--allowed-media-domains --api-keys --async --backend --cache-block-seq-len --cache-max-entry-count
--chat-template --communicator --cp --cudagraph-capture-batch-sizes --device --disable-fastapi-docs
--disable-metrics --dist-init-addr --distributed-executor-backend --dllm-block-length
--dllm-confidence-threshold --dllm-denoising-steps --dllm-unmasking-strategy --download-dir --dp --dtype
--eager-mode --empty-init --enable-abort-handling --enable-eplb --enable-microbatch --enable-prefix-caching
--enable-return-routed-experts --ep --generation-config --help --hf-overrides --kernel-block-size
--kv-transfer-config --language-model-only --log-level --logprobs-mode --max-batch-size
--max-concurrent-requests --max-log-len --max-prefill-iters --max-prefill-token-num --migration-backend
--model-format --model-name --moe-a2a-backend --nnodes --node-rank --num-gpu-blocks --num-tokens-per-iter
--piecewise-cudagraph-max-tokens --prefix-cache-decode-state-interval --prefix-cache-state-budget
--proxy-url --quant-policy --reasoning-parser --revision --role --rope-scaling-factor --server-name
--server-port --session-len --speculative-algorithm --speculative-dflash-block-size
--speculative-draft-model --speculative-num-draft-tokens --ssl --tool-call-parser --tp --trust-remote-code
--vision-max-batch-size
""".split())
LMDEPLOY_API_SERVER_CHOICES = {
    "--backend": {"pytorch", "turbomind"},
    "--role": {"Hybrid", "Prefill", "Decode"},
    "--migration-backend": {"DLSlime", "Mooncake"},
    "--log-level": {"CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"},
}
# lmdeploy 0.18.0 `lmdeploy serve proxy --help` (for docs/migrating-from-lmdeploy-proxy.md).
LMDEPLOY_PROXY_FLAGS = frozenset("""
--api-keys --disable-cache-status --disable-gdr --dummy-prefill --help --link-type --log-level
--migration-protocol --routing-strategy --server-name --server-port --serving-strategy --ssl
""".split())


# distserve's launcher for lmdeploy engines (lmdeploy's CLI with fixes installed; distserve/lmdeploy_ext).
LMDEPLOY_LAUNCHER = "distserve.lmdeploy_ext.serve"
# Its own option (what the engine tells agents to use for its links); every other argument goes to lmdeploy.
LAUNCHER_PROTOCOLS = frozenset({"auto", "tcp", "rdma", "nvlink"})


class CommandRejected(AssertionError):
    pass


def _parse(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as exc:
        raise CommandRejected(f"{what}: rejected {shlex.join(argv)!r}: {err.getvalue().strip()} (exit {exc.code})") from None


def distserve_parser(sub: str) -> argparse.ArgumentParser:
    """The parser `distserve <sub>` uses (the module's own add_arguments)."""
    from distserve.cli import SUBCOMMANDS

    if sub not in SUBCOMMANDS:
        raise CommandRejected(f"distserve has no sub-command {sub!r} (has: {', '.join(SUBCOMMANDS)})")
    module = importlib.import_module(SUBCOMMANDS[sub][0])
    parser = argparse.ArgumentParser(prog=f"distserve {sub}")
    module.add_arguments(parser)
    return parser


def ctl_parser() -> argparse.ArgumentParser:
    from distserve.ctl.main import build_parser

    return build_parser()


def check_command(argv: list[str], where: str = "") -> argparse.Namespace | None:
    """Raise CommandRejected unless `argv` (program first) is a valid command of a CLI we know."""
    if not argv:
        raise CommandRejected(f"{where}: empty command")
    prog = os.path.basename(argv[0])
    what = f"{where}: {prog}"
    if prog == "distserve":
        if len(argv) < 2:
            raise CommandRejected(f"{what}: no sub-command")
        return _parse(distserve_parser(argv[1]), argv[2:], f"{what} {argv[1]}")
    if prog == "distserve-ctl":
        return _parse(ctl_parser(), argv[1:], what)
    if prog == "lmdeploy":
        check_lmdeploy(argv, what)
        return None
    if prog.startswith("python") and argv[1:3] == ["-m", LMDEPLOY_LAUNCHER]:
        check_lmdeploy(lmdeploy_argv(argv), what)
        return None
    raise CommandRejected(f"{what}: unknown program {argv[0]!r}")


def lmdeploy_argv(argv: list[str]) -> list[str]:
    """`python -m distserve.lmdeploy_ext.serve api_server ...` is `lmdeploy serve api_server ...` (the launcher
    passes every argument to lmdeploy unchanged); other command lines are returned as they are."""
    if os.path.basename(argv[0]).startswith("python") and argv[1:3] == ["-m", LMDEPLOY_LAUNCHER]:
        if importlib.util.find_spec(LMDEPLOY_LAUNCHER) is None:
            raise CommandRejected(f"no module {LMDEPLOY_LAUNCHER}")
        rest = list(argv[3:])
        for i, word in enumerate(rest):  # the launcher's own option, removed before lmdeploy sees the rest
            name, eq, value = word.partition("=")
            if name == "--migration-protocol":
                value = value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
                if value not in LAUNCHER_PROTOCOLS:
                    raise CommandRejected(f"{LMDEPLOY_LAUNCHER}: --migration-protocol {value!r} is not one of "
                                          f"{sorted(LAUNCHER_PROTOCOLS)}")
                del rest[i:i + (1 if eq else 2)]
                break
        return ["lmdeploy", "serve", *rest]
    return argv


def check_lmdeploy(argv: list[str], what: str = "lmdeploy") -> dict[str, str | None]:
    """`lmdeploy serve api_server MODEL --flag value ...` against lmdeploy 0.18.0 (also through distserve's
    launcher); returns the flags."""
    argv = lmdeploy_argv(argv)
    if argv[1:3] != ["serve", "api_server"]:
        raise CommandRejected(f"{what}: expected 'lmdeploy serve api_server', got {shlex.join(argv[:3])!r}")
    flags: dict[str, str | None] = {}
    positional: list[str] = []
    rest = argv[3:]
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            if name not in LMDEPLOY_API_SERVER_FLAGS:
                raise CommandRejected(f"{what}: lmdeploy 0.18 api_server has no option {name}")
            if not eq:
                nxt = rest[i + 1] if i + 1 < len(rest) else None
                value = nxt if nxt is not None and not nxt.startswith("--") else None
                i += 1 if value is not None else 0
            if name in LMDEPLOY_API_SERVER_CHOICES and value not in LMDEPLOY_API_SERVER_CHOICES[name]:
                raise CommandRejected(f"{what}: {name} {value!r} is not one of {sorted(LMDEPLOY_API_SERVER_CHOICES[name])}")
            flags[name] = value
        else:
            positional.append(token)
        i += 1
    if len(positional) != 1:
        raise CommandRejected(f"{what}: expected exactly one model path, got {positional}")
    return flags
