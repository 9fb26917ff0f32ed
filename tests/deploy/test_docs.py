"""The user documentation against the real command-line parsers: every command and option in
docs/configuration.md exists (and every real one is documented), every environment variable the code reads
is documented, every command line and `distserve ...` mention in the user docs is accepted, and the
migration guide covers every `lmdeploy serve proxy` option."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from tests.deploy.clicheck import (LMDEPLOY_PROXY_FLAGS, CommandRejected, check_command, ctl_parser,
                                   distserve_parser)
from tests.util import REPO

DOCS = REPO / "docs"
CONFIG = DOCS / "configuration.md"
# The user documentation this suite keeps true (other pages are checked by their owners' tests).
USER_DOCS = [REPO / "README.md", CONFIG, DOCS / "architecture.md", DOCS / "deploy.md", DOCS / "security.md",
             DOCS / "migrating-from-lmdeploy-proxy.md"]
SECTION = re.compile(r"^(#{2,3}) (.+?)\s*$", re.M)
OPTION_ROW = re.compile(r"^\| `(--?[a-z][a-z0-9-]*)", re.M)
ENV_ROW = re.compile(r"^\| `(DISTSERVE_[A-Z0-9_]+)`", re.M)


def sections(text: str) -> dict[str, str]:
    """Heading text -> body, for headings of level 2 and 3."""
    marks = list(SECTION.finditer(text))
    return {m.group(2): text[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(text)]
            for i, m in enumerate(marks)}


def real_options(parser: argparse.ArgumentParser, public: bool = False) -> set[str]:
    """Long options of a parser; `public`: only those --help shows (hidden ones need no documentation)."""
    return {o for a in parser._actions for o in a.option_strings
            if o.startswith("--") and o != "--help" and not (public and a.help == argparse.SUPPRESS)}


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    return sections(CONFIG.read_text())


def documented(body: str, etcd: set[str]) -> set[str]:
    found = set(OPTION_ROW.findall(body))
    if "(#etcd-options)" in body:
        found |= etcd
    return found


def test_every_distserve_command_and_option_is_documented_and_real(reference):
    from distserve.cli import SUBCOMMANDS

    etcd = set(OPTION_ROW.findall(reference["etcd options"]))
    assert etcd == {"--etcd", "--etcd-ca", "--etcd-cert", "--etcd-key", "--etcd-user", "--etcd-password", "--etcd-timeout"}
    commands = {h[len("`distserve "):-1] for h in reference if re.fullmatch(r"`distserve [a-z-]+`", h)}
    assert commands == set(SUBCOMMANDS), f"documented {sorted(commands)}, real {sorted(SUBCOMMANDS)}"
    for sub in sorted(commands):
        docs = documented(reference[f"`distserve {sub}`"], etcd)
        parser = distserve_parser(sub)
        real, public = real_options(parser), real_options(parser, public=True)
        assert docs - real == set(), f"distserve {sub}: documented but not real: {sorted(docs - real)}"
        assert public - docs == set(), f"distserve {sub}: real but not in docs/configuration.md: {sorted(public - docs)}"


def test_every_distserve_ctl_command_and_option_is_documented_and_real(reference):
    parser = ctl_parser()
    etcd = set(OPTION_ROW.findall(reference["etcd options"]))
    global_docs = documented(reference["`distserve-ctl`"], etcd)
    global_real = real_options(parser)
    assert global_docs == global_real, f"distserve-ctl: docs {sorted(global_docs)} != real {sorted(global_real)}"
    subs = subparsers_of(parser)
    commands = {h[len("`distserve-ctl "):-1] for h in reference if re.fullmatch(r"`distserve-ctl [a-z-]+`", h)}
    assert commands == set(subs), f"documented {sorted(commands)}, real {sorted(subs)}"
    for name in sorted(commands):
        docs = set(OPTION_ROW.findall(reference[f"`distserve-ctl {name}`"]))
        real = real_options(subs[name]) - global_real
        public = real_options(subs[name], public=True) - global_real
        assert docs - real == set(), f"distserve-ctl {name}: documented but not real: {sorted(docs - real)}"
        assert public - docs == set(), f"distserve-ctl {name}: real but not documented: {sorted(public - docs)}"


def test_every_environment_variable_is_documented_and_read_by_the_code(reference):
    docs = set(ENV_ROW.findall(reference["Environment variables"]))
    code: set[str] = set()
    for root in ("distserve", "discovery", "tools"):
        for path in (REPO / root).rglob("*"):
            if path.is_file() and path.suffix in ("", ".py", ".sh"):
                # A name followed by `_` or `*` is a prefix (DISTSERVE_ETCD_*, f"DISTSERVE_ETCD_{x}"), not a variable.
                code |= set(re.findall(r"DISTSERVE_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_*{])", path.read_text(errors="replace")))
    assert docs - code == set(), f"documented but read nowhere: {sorted(docs - code)}"
    assert code - docs == set(), f"read by the code but not in docs/configuration.md: {sorted(code - docs)}"
    mentioned = set(re.findall(r"DISTSERVE_[A-Z0-9_]*[A-Z0-9]", CONFIG.read_text()))
    assert mentioned <= docs | {"DISTSERVE_ETCD"}, sorted(mentioned - docs)


# --- command lines and mentions in the user docs ----------------------------------------------------------
def code_block_commands(text: str) -> list[str]:
    """Lines of the shell code blocks (``` or ```sh/bash/shell); diagrams are ```text or ```mermaid."""
    lines, language, block = [], None, []
    for line in text.splitlines():
        fence = re.match(r"^```(\S*)\s*$", line)
        if fence and language is None:
            language, block = fence.group(1), []
        elif fence:
            if language in ("", "sh", "bash", "shell"):
                joined = re.sub(r"\\\n\s*", " ", "\n".join(block))
                lines += [item.strip() for item in joined.splitlines() if item.strip()]
            language = None
        elif language is not None:
            block.append(line)
    assert language is None, "unclosed code block"
    return lines


def to_argv(line: str) -> list[str] | None:
    """A documented shell line as the argv of a command we can check, or None for other programs."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError as exc:
        raise AssertionError(f"unparsable shell line {line!r}: {exc}") from None
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    for i, word in enumerate(words):  # stop at shell operators
        if word in ("|", "&&", ";", "||"):
            words = words[:i]
            break
    prog = Path(words[0]).name
    if prog == "demo" and words[0].endswith("tools/demo"):
        return ["distserve", "up", *words[1:]]
    if prog in ("distserve", "distserve-ctl", "lmdeploy") or (prog.startswith("python") and words[1:2] == ["-m"]
                                                              and words[2].startswith("distserve")):
        return words
    if words[:3] == ["docker", "compose", "exec"] or words[:2] == ["kubectl", "exec"]:
        rest = words[words.index("--") + 1:] if "--" in words else words[4:]
        return to_argv(shlex.join(rest))
    return None


def check_line(argv: list[str], where: str) -> None:
    if Path(argv[0]).name == "lmdeploy" and argv[1:3] == ["serve", "proxy"]:
        unknown = {w.split("=")[0] for w in argv if w.startswith("--")} - LMDEPLOY_PROXY_FLAGS
        assert not unknown, f"{where}: lmdeploy serve proxy has no {sorted(unknown)}"
        return
    check_command(argv, where=where)


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_every_command_line_in_the_docs_is_accepted(doc):
    checked = 0
    for line in code_block_commands(doc.read_text()):
        argv = to_argv(line)
        if argv is not None:
            check_line(argv, where=f"{doc.name}: {line[:80]}")
            checked += 1
    if doc.name in ("README.md", "deploy.md", "migrating-from-lmdeploy-proxy.md"):
        assert checked >= 2, f"{doc.name}: expected command lines to check"


def mentioned_options(span: str) -> tuple[list[str], list[str]]:
    """`distserve router --host` -> (["distserve", "router"], ["--host"]); alternatives like a|b are fine."""
    words = span.replace("\\|", " ").split()
    head = [w for w in words if not w.startswith("-")][:2 if words[0] == "distserve" else 2]
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    return head, flags


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_every_distserve_option_mentioned_in_the_docs_exists(doc):
    from distserve.cli import SUBCOMMANDS

    ctl = ctl_parser()
    ctl_subs = subparsers_of(ctl)
    for span in re.findall(r"`(distserve(?:-ctl)? [^`]+)`", doc.read_text()):
        head, flags = mentioned_options(span)
        if head[0] == "distserve":
            sub = head[1] if len(head) > 1 else None
            assert sub in SUBCOMMANDS, f"{doc.name}: `{span}`: no command distserve {sub}"
            valid = real_options(distserve_parser(sub))
        else:
            valid = real_options(ctl)
            if len(head) > 1 and head[1] in ctl_subs:
                valid |= real_options(ctl_subs[head[1]])
            elif len(head) > 1 and not head[1].isupper():
                raise AssertionError(f"{doc.name}: `{span}`: no command distserve-ctl {head[1]}")
        unknown = set(flags) - valid
        assert not unknown, f"{doc.name}: `{span}`: no option {sorted(unknown)}"


def test_the_docs_check_rejects_a_wrong_option():
    """The checks above can fail: a misspelt option and an unknown command are caught."""
    with pytest.raises(CommandRejected):
        check_command(["distserve", "router", "--prot", "8000"])
    with pytest.raises(CommandRejected):
        check_command(["distserve", "rooter"])
    with pytest.raises(CommandRejected):
        check_command(["python", "-m", "distserve.lmdeploy_ext.serve", "api_server", "m", "--role", "Prefil"])


def test_the_migration_guide_maps_every_lmdeploy_proxy_option():
    text = (DOCS / "migrating-from-lmdeploy-proxy.md").read_text()
    table = sections(text)["`lmdeploy serve proxy` options, one by one"]
    first_column = {re.match(r"`(--[a-z-]+)", row).group(1) for row in re.findall(r"^\| (`--[^|]+)", table, re.M)}
    assert first_column == LMDEPLOY_PROXY_FLAGS - {"--help"}


# --- links ------------------------------------------------------------------------------------------------
def anchors(path: Path) -> set[str]:
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).strip().replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    # Pages other engineers own may land after this one; a link to them is checked only when present.
    others = {"keys.md", "etcd-clients.md", "operations.md", "router.md", "agent.md", "reference-engine.md",
              "benchmarks.md", "gpu.md", "internals.md"}
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if path.name in others and not path.exists():
            continue
        assert path.exists(), f"{doc.name}: broken link {target}"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: no heading for #{anchor} in {path.name}"
