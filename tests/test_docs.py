"""The design document agrees with the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_the_stage_table_is_the_one_the_code_declares():
    from streams.stages import stage_table_markdown

    text = ARCHITECTURE.read_text()
    block = re.search(r"<!-- stage-table -->\n(.*?)\n<!-- /stage-table -->", text, re.S)
    assert block, "docs/architecture.md lost its stage-table markers"
    assert block.group(1) == stage_table_markdown()


def test_every_module_is_in_the_module_map():
    text = ARCHITECTURE.read_text()
    for pkg in ("broker", "streams"):
        for path in sorted((ROOT / pkg).iterdir()):
            name = path.stem if path.suffix == ".py" else f"{path.name}/"
            if name.startswith("_") or not (path.suffix == ".py" or (path / "__init__.py").exists()):
                continue
            assert f"`{name}`" in text, f"{pkg}/{path.name} is not described in docs/architecture.md"


def test_the_readme_links_the_design_document():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()


#: The documents users follow literally, and the deployment files whose command lines run `broker`.
USER_DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "docker-compose.yml",
             *sorted((ROOT / "k8s").glob("*.yaml")))


def _documented_commands():
    """Every ``broker SUBCOMMAND ...`` the documents write: (file, words after ``broker``)."""
    import shlex

    pattern = re.compile(r"(?:^|[`\s(\"'$])broker ([a-z][\w-]*(?: [^`\n#]*)?)")
    for path in USER_DOCS:
        text = path.read_text().replace("\\\n", " ")
        for match in pattern.finditer(text):
            line = re.split(r"&&|\|\||;|\|", match.group(1))[0]
            try:
                words = shlex.split(line)
            except ValueError:  # an unbalanced quote in prose
                words = line.split()
            yield path.relative_to(ROOT), words


def test_every_documented_command_and_option_exists():
    import typer.main

    from streams.cli import app

    root = typer.main.get_command(app)
    wrong = []
    for path, words in _documented_commands():
        command, names = root, []
        while words and hasattr(command, "commands") and words[0] in command.commands:
            names.append(words[0])
            command = command.commands[words.pop(0)]
        if not names:
            continue  # "broker" in prose ("the broker takes frames ...")
        if hasattr(command, "commands"):
            if words and not words[0].startswith("-"):
                wrong.append(f"{path}: broker {' '.join(names)} has no subcommand {words[0]!r}")
            continue
        options = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for word in words:
            if word == "--":
                break
            if word.startswith("--") and word.split("=")[0] not in options:
                wrong.append(f"{path}: broker {' '.join(names)} has no option {word.split('=')[0]}")
    assert not wrong, "\n".join(wrong)


def test_the_readme_archive_queries_run(tmp_path):
    """Each ``broker query`` of README.md's archive section runs over an archive (its SQL, columns and macros)."""
    import shlex

    from typer.testing import CliRunner

    from broker.archive.log import OffsetRange
    from broker.archive.reader import Archive
    from broker.archive.rows import to_batch
    from broker.archive.writer import ArchiveWriter
    from streams.cli import app
    from tests.broker.test_archive import archived, objects

    writer = ArchiveWriter(Archive(tmp_path / "archive"))
    writer.recover()
    writer.commit(writer.write([to_batch(archived(objects(10, 4)))]), [OffsetRange("alerts", 0, 0, 10)])
    block = re.search(r"```\nA=var/demo/state/archive\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md lost its archive query examples"
    code = "\n".join(line for line in block.group(1).splitlines() if not line.startswith("#"))
    words = shlex.split(code.replace("$A", str(tmp_path / "archive")).replace("real.parquet",
                                                                              str(tmp_path / "real.parquet")))
    commands: list[list[str]] = []
    for word in words:
        if word == "broker":
            commands.append([])
        else:
            commands[-1].append(word)
    assert len(commands) == 3 and all(c[0] == "query" for c in commands)
    for args in commands:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"broker {' '.join(args)}: {result.output}"


def test_the_topic_table_names_the_current_schema_versions():
    """The value schemas of "Topics and messages" are those the code writes (``schemas.CURRENT``)."""
    import schemas

    text = ARCHITECTURE.read_text()
    table = re.search(r"## Topics and messages\n\n(\|.*?)\n\n", text, re.S)
    assert table, "docs/architecture.md lost its topic table"
    named = re.findall(r"\(`(\w+)/v(\d+)`", table.group(1))
    assert {name for name, _ in named} == set(schemas.CURRENT), named
    stale = [f"{name}/v{v}" for name, v in named if int(v) != schemas.CURRENT[name]]
    assert not stale, f"docs/architecture.md names {stale}; the code writes {schemas.CURRENT}"


def test_the_install_instructions_name_every_extra():
    """README's set-up and architecture.md's "Dependencies" name each extra of pyproject.toml."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (ROOT / "README.md").read_text()
    section = ARCHITECTURE.read_text().split("## Dependencies", 1)[1].split("\n## ", 1)[0]
    assert not {e for e in extras if f"`[{e}]`" not in readme}, "README.md's set-up misses an extra"
    assert not {e for e in extras if f"`{e}`" not in section}, "docs/architecture.md's Dependencies misses an extra"
    if any("s3" in requirement for requirement in extras["test"] if requirement.startswith("transient-broker[")):
        assert "but `s3`" not in section, "docs/architecture.md says [test] leaves out s3; it pulls it"


def test_the_schema_table_lists_the_versions_kept_and_written():
    """schemas/README.md's table: each record's versions and its current one, as ``schemas`` has them."""
    import schemas

    text = (ROOT / "schemas" / "README.md").read_text()
    rows = {m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r"^\| `(\w+)` \| [^\n]*? \| ([\d, ]+) \| (\d+) \|$", text, re.M)}
    assert set(rows) == set(schemas.CURRENT), rows
    for name, (versions, current) in rows.items():
        assert [int(v) for v in versions.split(",")] == schemas.versions(name), f"{name}: versions {versions}"
        assert int(current) == schemas.CURRENT[name], f"{name}: current {current}, written {schemas.CURRENT[name]}"
    assert f"| alert v{schemas.CURRENT['alert']} field |" in ARCHITECTURE.read_text()


def test_the_readme_installs_the_torch_that_constraints_pins():
    """README's CPU-torch command names the version constraints.txt pins (the two moved apart silently)."""
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned, "constraints.txt no longer pins torch"
    assert f"pip install torch=={pinned.group(1)} --index-url" in (ROOT / "README.md").read_text()



def test_every_toml_snippet_of_the_docs_loads(tmp_path):
    """Each ``toml`` block of README.md and docs/ loads as a pipeline config, or as a telescope profile."""
    from broker.config import load_config
    from broker.telescopes import load_profile

    snippet = tmp_path / "snippet.toml"
    for path in (p for p in USER_DOCS if p.suffix == ".md"):
        for block in re.findall(r"```toml\n(.*?)```", path.read_text(), re.S):
            snippet.write_text(block)
            if block.startswith("# telescope profile"):
                load_profile(snippet)
            else:
                load_config(snippet)


def _config_table(path: str) -> object:
    """The config dataclass of the TOML table ``path`` (``ingest.calibration``), ``dict`` for a free table, or None."""
    import dataclasses
    import typing

    from broker.config import PipelineConfig

    table: object = PipelineConfig
    for part in path.split("."):
        hints = typing.get_type_hints(table)
        if part not in hints:
            return None
        hint = hints[part]
        args = typing.get_args(hint)
        table = args[0] if args and dataclasses.is_dataclass(args[0]) else hint
        if not dataclasses.is_dataclass(table):
            return dict if dict in (table, typing.get_origin(table)) else None
    return table


def test_every_config_table_and_key_the_docs_name_exists():
    """``[table] key`` and ``[[table]]`` in README.md and docs/ name settings of the pipeline config."""
    import dataclasses
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    wrong = []
    for path in (p for p in USER_DOCS if p.suffix == ".md"):
        for match in re.finditer(r"`\[\[?([a-z_.]+)\]\]?(?: ([a-z_]+))?", path.read_text()):
            name, key = match.groups()
            if name in extras or (name == "filters" and path.name == "telescopes.md"):  # an extra; a profile's table
                continue
            table = _config_table(name)
            if table is None:
                wrong.append(f"{path.relative_to(ROOT)}: no table [{name}]")
            elif key and table is not dict and key not in {f.name for f in dataclasses.fields(table)}:
                wrong.append(f"{path.relative_to(ROOT)}: no setting {key} in [{name}]")
    assert not wrong, "\n".join(wrong)


def test_every_api_path_the_docs_name_is_served(tmp_path):
    """``GET /api/v1/...`` and ``POST /api/v1/...`` in README.md and docs/ are the portal's routes, with that method."""
    pytest.importorskip("fastapi")
    from streams.web.app import create_app
    from streams.web.config import WebConfig

    paths = create_app(WebConfig.for_state_dir(tmp_path)).openapi()["paths"]
    routes = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", p) + "$"), {m.upper() for m in ops})
              for p, ops in paths.items()]
    wrong = []
    for path in (p for p in USER_DOCS if p.suffix == ".md"):
        for match in re.finditer(r"(?:(GET|POST)`?,? `?)?(/api/v1/[\w/{}.-]*\w)", path.read_text()):
            method, url = match.groups()
            if not any(rx.match(url) and (method is None or method in methods) for rx, methods in routes):
                wrong.append(f"{path.relative_to(ROOT)}: {method or ''} {url}")
    assert not wrong, "\n".join(wrong)


def test_every_repository_path_the_docs_name_exists():
    """Files and folders of this repository that README.md and docs/ name in code spans exist (placeholders aside)."""
    missing = []
    for path in (p for p in USER_DOCS if p.suffix == ".md"):
        for match in re.finditer(r"`((?:tests|broker|streams|deploy|k8s|bench|schemas|docs|\.ci)/[\w./-]*)([^\w./-]?)",
                                 path.read_text()):
            name, after = match.group(1).rstrip("."), match.group(2)
            if after in ("{", "<", "*") or re.search(r"/vN\.", name):  # a pattern: <stage>, {id}, *.py, vN.avsc
                continue
            if not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "\n".join(missing)
