"""Plan files: TOML and YAML build the same plan; every mistake names the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from karbor_async import BarrierPolicy, Plan
from karbor_async._planfile import PlanFileError, format_key, load_plan_file

TOML_PLAN = """\
name = "shop"
barrier = "cut"
merge_groups = false
resources = [
  { type = "OS::Nova::Server", id = "s1", name = "web" },
  "OS::Cinder::Volume#v9",
]

[parameters."OS::Nova::Server"]
quiesce = true

[parameters."OS::Nova::Server#s1"]
flavor = "m1.small"

[[groups]]
name = "db"
resources = ["OS::Cinder::Volume#v9"]
barrier = "main"

[timeouts]
hook = 30
run = "none"
quiesce_budget = 5.5
per_type = { "OS::Cinder::Volume" = 10 }

[limits]
"OS::Cinder::Volume" = 4
"""

YAML_PLAN = """\
name: shop
barrier: cut
merge_groups: false
resources:
  - {type: "OS::Nova::Server", id: s1, name: web}
  - "OS::Cinder::Volume#v9"
parameters:
  "OS::Nova::Server": {quiesce: true}
  "OS::Nova::Server#s1": {flavor: m1.small}
groups:
  - name: db
    resources: ["OS::Cinder::Volume#v9"]
    barrier: main
timeouts:
  hook: 30
  run: null
  quiesce_budget: 5.5
  per_type: {"OS::Cinder::Volume": 10}
limits:
  "OS::Cinder::Volume": 4
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_and_yaml_describe_the_same_plan(tmp_path: Path) -> None:
    """A plan file in either format builds the plan Plan.from_json would."""
    from_toml = load_plan_file(_write(tmp_path, "p.toml", TOML_PLAN))
    from_yaml = load_plan_file(_write(tmp_path, "p.yaml", YAML_PLAN))
    assert from_toml.to_json() == from_yaml.to_json()
    assert isinstance(from_toml, Plan)
    assert from_toml.barrier is BarrierPolicy.CUT
    assert [r.key for r in from_toml.resources] == [
        ("OS::Nova::Server", "s1"),
        ("OS::Cinder::Volume", "v9"),
    ]
    assert from_toml.timeouts.run is None and from_toml.timeouts.quiesce_budget == 5.5
    assert from_toml.groups[0].barrier is BarrierPolicy.MAIN
    assert from_toml.parameters["OS::Nova::Server#s1"]["flavor"] == "m1.small"


def _error(tmp_path: Path, name: str, text: str) -> PlanFileError:
    with pytest.raises(PlanFileError) as info:
        load_plan_file(_write(tmp_path, name, text))
    return info.value


@pytest.mark.parametrize(
    ("name", "text", "line", "needle"),
    [
        ("syntax.toml", 'name = "x"\nresources = [\n  { type = }\n]\n', 3, "invalid TOML"),
        (
            "unknown.toml",
            'name = "x"\nbarier = "cut"\nresources = ["A#1"]\n',
            2,
            "barier: unknown key; did you mean 'barrier'?",
        ),
        (
            "hook.toml",
            'name = "x"\nresources = ["A#1"]\n\n[timeouts]\nabort = 3\nhook = "10s"\n',
            6,
            "timeouts.hook: expected a positive number of seconds",
        ),
        (
            "item.toml",
            'name = "x"\nresources = [\n  { type = "A", id = "1" },\n  { type = "B" },\n]\n',
            4,
            "resources[1]: the resource is missing the key 'id'",
        ),
        (
            "table.toml",
            'name = "x"\n\n[[resources]]\ntype = "A"\nid = "1"\n\n'
            '[[resources]]\ntype = 5\nid = "2"\n',
            8,
            "resources[1].type: expected the resource type (a non-empty string), got number 5",
        ),
        (
            "barrier.yaml",
            "name: x\nresources: ['A#1']\nbarrier: strict\n",
            3,
            "barrier: expected one of none, main, cut, got string 'strict'",
        ),
        (
            "limit.yml",
            "name: x\nresources: ['A#1']\nlimits:\n  A: 0\n",
            4,
            "limits.A: expected a whole number >= 1",
        ),
        ("syntax.yaml", "name: x\nresources: [A#1\n", 3, "invalid YAML"),
        ("dup.yaml", "name: x\nname: y\nresources: ['A#1']\n", 2, "name: appears twice"),
        (
            "date.yaml",
            "name: x\nresources: ['A#1']\nparameters:\n  A: {when: 2024-01-02}\n",
            4,
            "parameters.A.when: expected a string, number",
        ),
        (
            "member.yaml",
            "name: x\nresources: ['A#1']\ngroups:\n  - name: g\n    resources: [A]\n",
            5,
            "groups[0].resources[0]: expected a resource written TYPE#ID",
        ),
    ],
)
def test_errors_name_the_file_the_line_and_the_key(
    tmp_path: Path, name: str, text: str, line: int, needle: str
) -> None:
    """A bad plan file's message says which file, which line, which key and what is expected."""
    err = _error(tmp_path, name, text)
    message = str(err)
    assert message.startswith(f"{tmp_path / name}:{line}: "), message
    assert needle in message
    assert err.line == line


def test_file_level_problems(tmp_path: Path) -> None:
    """A missing file, an unknown suffix, an empty YAML file and a plan-level mistake."""
    assert "no such file" in str(_error_missing(tmp_path))
    assert "expected .toml, .yaml or .yml" in str(_error(tmp_path, "plan.json", "{}"))
    assert "is empty" in str(_error(tmp_path, "empty.yaml", "\n"))
    twice = _error(tmp_path, "twice.yaml", "name: x\nresources: ['A#1', 'A#1']\n")
    assert "names A#1 twice" in str(twice)
    assert "missing the key 'resources'" in str(_error(tmp_path, "nores.toml", 'name = "x"\n'))


def _error_missing(tmp_path: Path) -> PlanFileError:
    with pytest.raises(PlanFileError) as info:
        load_plan_file(tmp_path / "absent.toml")
    return info.value


def test_format_key_quotes_what_is_not_a_bare_key() -> None:
    assert format_key(("timeouts", "hook")) == "timeouts.hook"
    assert format_key(("resources", 2, "id")) == "resources[2].id"
    assert format_key(("parameters", "OS::Nova::Server")) == 'parameters."OS::Nova::Server"'
