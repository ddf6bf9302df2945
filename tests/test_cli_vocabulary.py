"""One vocabulary across commands, checked against the flag table in docs/usage.md (section 7).

The table is parsed from the docs, and every command's options are read from click
(``typer.main.get_command``), so the docs and the code cannot drift apart:

- every visible flag of every command is in the table, in the row whose Commands cell names that command;
- every flag the table lists for a command exists there (except flags other branches are adding);
- every hidden option is an old name listed in the table's last column, and prints a deprecation note;
- no concept (a set of synonyms, below) is named two ways by the visible flags of the commands.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dpquant_sim.cli import _register, app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "usage.md"

# Flags the table may list ahead of the code that adds them (none now: every listed flag exists). Once a flag
# exists in a command, the full check applies to it.
PLANNED: set[str] = set()

# Concept -> every name it has had, in any command. The visible flags of all commands together may use only
# one name (plus its short form) per concept.
CONCEPTS: dict[str, set[str]] = {
    "recipe": {"--recipe", "--quantize", "--format", "--formats", "--precision"},
    "batch size": {"--batch-size", "--batch"},
    "accelerators": {"--accelerators", "--hw", "--profiles", "--accelerator"},
    "progress": {"--quiet", "--progress", "--no-progress", "--silent"},
    "private": {"--private", "--dp", "--no-dp", "--non-private"},
    "clipping algorithm": {"--clipping", "--dp-algorithm", "--clip-algorithm"},
    "output": {"--out", "--output", "--out-dir"},
    "json": {"--json", "--as-json", "--format-json"},
    "workers": {"--workers", "--jobs", "--num-workers"},
    "epsilon": {"--epsilon", "--eps", "--target-epsilon"},
    "training examples": {"--n-train", "--num-train", "--train-size"},
    "profile folder": {"--hw-dir", "--profiles-dir", "--profile-dir"},
}
SHORT = {"-o", "-c", "-q"}  # short forms, listed beside their long flag in the table


def _walk(cmd, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def commands() -> dict[str, object]:
    _register()
    return dict(_walk(typer.main.get_command(app)))


def options(cmd, *, hidden: bool) -> list[list[str]]:
    """Each option's names (long, short and --no- forms) of one click command, visible or hidden ones."""
    return [[*p.opts, *p.secondary_opts] for p in cmd.params
            if p.param_type_name == "option" and bool(p.hidden) == hidden]


def _flags(cell: str) -> list[str]:
    return re.findall(r"`(-{1,2}[a-z0-9][a-z0-9-]*)`", cell)


def flag_table() -> list[dict]:
    """The rows of docs/usage.md's flag table: concept, flags, commands, yaml cell, old names by command."""
    text = DOCS.read_text(encoding="utf-8")
    m = re.search(r"<!-- flag-table:begin -->\n(.*?)<!-- flag-table:end -->", text, re.S)
    assert m, "docs/usage.md has no flag table between <!-- flag-table:begin/end --> markers"
    rows = []
    for line in m.group(1).strip().splitlines()[2:]:  # header and |---| rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, f"flag table row without 5 cells: {line}"
        concept, flag, cmds, yaml_cell, old = cells
        old_names: dict[str, set[str]] = {}
        for part in re.findall(r"((?:`[^`]+`(?:\s*/\s*)?)+)\s*\(([^)]*)\)", old):
            for c in part[1].split(","):
                old_names.setdefault(c.strip(), set()).update(_flags(part[0]))
        rows.append({"concept": concept, "flags": _flags(flag), "commands": [c.strip() for c in cmds.split(",")],
                     "yaml": yaml_cell, "old": old_names})
    return rows


def test_table_parses_and_is_not_empty():
    rows = flag_table()
    assert len(rows) > 40
    assert all(r["flags"] and r["commands"] for r in rows)
    seen: dict[str, str] = {}
    for r in rows:  # a flag belongs to one concept (one row)
        for f in r["flags"]:
            assert f not in seen, f"{f} is in two rows of the flag table: {seen[f]!r} and {r['concept']!r}"
            seen[f] = r["concept"]


def test_every_visible_flag_is_in_the_table_for_its_command():
    rows = flag_table()
    missing = []
    for name, cmd in commands().items():
        for names in options(cmd, hidden=False):
            for f in names:
                if f == "--help":
                    continue
                if not any(f in r["flags"] and name in r["commands"] for r in rows):
                    missing.append(f"{name} {f}")
    assert not missing, f"flags not in docs/usage.md's table (or not listed for that command): {missing}"


def test_every_flag_in_the_table_exists_in_its_commands():
    cmds = commands()
    wrong = []
    for r in flag_table():
        for c in r["commands"]:
            assert c in cmds, f"the flag table names a command that does not exist: {c!r} (row {r['concept']!r})"
            have = {f for names in options(cmds[c], hidden=False) for f in names}
            wrong += [f"{c} {f}" for f in r["flags"] if f not in have and f not in PLANNED]
    assert not wrong, f"flags the table lists but the command lacks (or hides): {wrong}"


def test_hidden_options_are_documented_old_names():
    rows = flag_table()
    undocumented = []
    for name, cmd in commands().items():
        for names in options(cmd, hidden=True):
            for f in names:
                if not any(f in r["old"].get(name, set()) for r in rows):
                    undocumented.append(f"{name} {f}")
    assert not undocumented, f"hidden options missing from the table's old-names column: {undocumented}"
    for r in rows:  # and every documented old name is really there, hidden
        for c, olds in r["old"].items():
            hidden = {f for names in options(commands()[c], hidden=True) for f in names}
            assert olds <= hidden, f"{c}: old names {olds - hidden} of {r['concept']!r} are not hidden options"


def test_no_concept_is_named_two_ways():
    used: dict[str, dict[str, set[str]]] = {k: {} for k in CONCEPTS}
    for name, cmd in commands().items():
        for names in options(cmd, hidden=False):
            for concept, syn in CONCEPTS.items():
                hit = [f for f in names if f in syn]
                if hit:
                    used[concept].setdefault(hit[0], set()).add(name)
    two = {c: u for c, u in used.items() if len(u) > 1}
    assert not two, f"concepts named differently by different commands: {two}"
    # and the table has one row per concept
    rows = flag_table()
    for concept, syn in CONCEPTS.items():
        hits = [r["concept"] for r in rows if set(r["flags"]) & syn]
        assert len(hits) <= 1, f"concept {concept!r} has several rows in the table: {hits}"


def test_yaml_fields_of_the_table_exist():
    from dpquant_sim.sweep.config import SweepConfig
    from dpquant_sim.training.config import TrainConfig

    train, sweep = set(TrainConfig.model_fields), set(SweepConfig.model_fields)
    for r in flag_table():
        if set(r["flags"]) & PLANNED:
            continue
        for part in r["yaml"].split(";"):
            for f in re.findall(r"`([a-z_][a-z0-9_.<>]*)`", part):
                head = f.split(".")[0]
                pool = sweep if part.strip().startswith("sweep:") else train
                assert head in pool, f"row {r['concept']!r}: {f!r} is not a {'sweep' if pool is sweep else 'train'} " \
                                     "config field"


# ---------------------------------------------------------------------------------------------- old names

def _invoke(args, **kw):
    _register()
    return CliRunner().invoke(app, args, **kw)


@pytest.mark.parametrize("args,old,new,needle", [
    (["train", "--out", "{tmp}/r", "--quantize", "fp5"], "--quantize", "--recipe", "--quantize='fp5'"),
    (["train", "--out", "{tmp}/r", "--no-progress", "--epochs", "0"], "--no-progress", "--quiet", "--epochs=0"),
    (["cost", "--model", "mlp", "--input", "64", "--format", "fp5"], "--format", "--recipe", "--format='fp5'"),
    (["cost", "--model", "mlp", "--input", "64", "--hw", "nope"], "--hw", "--accelerators", "--hw='nope'"),
    (["cost", "--model", "mlp", "--input", "64", "--batch", "-1"], "--batch", "--batch-size", "--batch=-1.0"),
    (["cost", "--model", "mlp", "--input", "64", "--dp-algorithm", "nope"], "--dp-algorithm", "--clipping",
     "'nope'"),
    (["cost", "--model", "mlp", "--input", "64", "--no-dp", "--hw", "nope"], "--no-dp", "--private", "'nope'"),
    (["report", "{tmp}", "--dp-algorithm", "nope"], "--dp-algorithm", "--clipping", "nope"),
])
def test_old_names_work_with_a_deprecation_note(tmp_path, capsys, args, old, new, needle):
    from dpquant_sim.cli import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"note: {old} is deprecated" in err and f"use {new}" in err, err
    assert needle in err, err


def test_errors_name_the_flag_typed_not_the_field(tmp_path, capsys):
    from dpquant_sim.cli import main

    for argv, needle in (
        (["train", "--out", str(tmp_path / "r"), "--recipe", "fp5", "-q"], "error: --recipe='fp5' is not allowed"),
        (["train", "--out", str(tmp_path / "r"), "--batch-size", "5000", "-q"], "error: --batch-size=5000"),
        (["train", "--out", str(tmp_path / "r"), "--schedule", "random", "--budget", "1.5", "-q"],
         "error: --budget=1.5"),
        (["train", "--out", str(tmp_path / "r"), "--schedule", "dpquant", "--schedule-opt", "temperature=-1", "-q"],
         "error: --schedule-opt temperature=-1"),
        (["cost", "--model", "mlp", "--input", "64", "--recipe", "fp5"], "error: --recipe='fp5'"),
        (["demo", "--out", str(tmp_path / "d"), "--recipe", "fp5"], "error: --recipe='fp5'"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "recipe=" not in err.replace("--recipe=", ""), (argv, err)
        assert "deprecated" not in err


def test_a_yaml_value_names_the_file_and_field(tmp_path, capsys):
    from dpquant_sim.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("recipe: fp5\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err
    assert f"{cfg}: recipe='fp5' is not allowed" in err, err


def test_old_and_new_name_together_disagreeing_is_refused(tmp_path, capsys):
    from dpquant_sim.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "r"), "--recipe", "fp8", "--quantize", "fp4"])
    assert e.value.code == 2
    assert "--quantize='fp4' is not allowed; expected no --quantize together with --recipe" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 80 columns

@pytest.mark.parametrize("name", sorted(commands()))
def test_help_fits_80_columns_with_full_flag_names(name):
    r = _invoke([*name.split(), "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(map(len, lines)) <= 80, [ln for ln in lines if len(ln) > 80]
    assert "…" not in r.output
    for names in options(commands()[name], hidden=False):
        for f in names:
            assert re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", r.output), f"{name} --help: {f} not shown in full"
    for names in options(commands()[name], hidden=True):
        for f in names:
            assert not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", r.output), f"{name} --help shows hidden {f}"
