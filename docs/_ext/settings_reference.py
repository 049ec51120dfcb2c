"""The configuration reference, generated from the settings' declarations.

`provisioner/settings.py` declares every setting once (`Setting`: name, type, default,
help, parse, who may set it, whether the policy bounds it, where it is enforced), and
each backend declares its own the same way. The `settings-reference` directive renders
those declarations, through `provisioner.settings.reference`, as a summary table and one
section per setting, so that the page can never disagree with the code: a setting added,
renamed or moved shows up on the next `make docs`.

Each section says where the setting is declared (file and line, found in the source),
which function parses its values (file and line), and where it takes effect
(`Setting.enforced`), so that a reader finds all three from the page alone.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

import provisioner
from provisioner import backends, settings
from provisioner.settings import Reference, Setting

LOG = logging.getLogger(__name__)
PACKAGE = Path(provisioner.__file__).resolve().parent
ROOT = PACKAGE.parent

COMMON_SCOPES = ("all backends", "policy file")
"""`Reference.scope` of the settings in settings.py; any other scope is a backend's name."""

WHO = {
    settings.OPERATOR: "operator: {config} in the server's or the sandbox service's config",
    settings.KERNELSPEC: "kernelspec: `metadata.kernel_provisioner.config.{name}`",
    settings.USER: "user: a user's own server asking the sandbox service",
    settings.POLICY: "policy file only: a `[default]`, `[groups.NAME]` or `[users.NAME]` key",
}
"""How each kind of author writes a setting; the order is the reference's."""


def backend_settings() -> dict[str, tuple[Setting, ...]]:
    """Each registered backend's own settings, and the common ones whose default it
    changes, by backend name (`backends.registered`)."""
    return {
        backend.name: tuple(s for s in backend.declared() if s.name in backend.changed_defaults)
        + tuple(backend.settings)
        for backend in backends.registered()
    }


def declarations() -> dict[str, list[tuple[str, int]]]:
    """Where each setting is declared: name -> (path from the repository root, line) of
    every `Setting("name", ...)` call in the package's source."""
    found: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "guest" in path.relative_to(PACKAGE).parts:  # the guest's code, linked in
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _called(node) == "Setting"):
                continue
            name = _first_argument(node)
            if name is not None:
                found.setdefault(name, []).append((str(path.relative_to(ROOT)), node.lineno))
    return found


def _called(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def _first_argument(call: ast.Call) -> str | None:
    values = [*call.args[:1], *(k.value for k in call.keywords if k.arg == "name")]
    if values and isinstance(values[0], ast.Constant) and isinstance(values[0].value, str):
        return values[0].value
    return None


def declared_at(row: Reference, found: dict[str, list[tuple[str, int]]]) -> str:
    """`path:line` of the row's declaration: in a backend's module for a backend's own
    setting, in settings.py for the others (a warm pool's too, which a backend takes in);
    "" if there is none there."""
    common = row.scope in COMMON_SCOPES
    changed = not common and row.setting.name in settings.BY_NAME  # a backend's own default
    shared = common or changed or row.setting in settings.POOL
    places = [
        f"{path}:{line}"
        for path, line in found.get(row.setting.name, [])
        if (path == "provisioner/settings.py") == shared
    ]
    if changed:
        source = Path(inspect.getsourcefile(type(backends.get(row.scope))) or "")
        lines = source.read_text().splitlines()
        line = next(i for i, text in enumerate(lines, 1) if "changed_defaults =" in text)
        places.append(f"its default: {source.resolve().relative_to(ROOT)}:{line}")
    return ", ".join(places)


def parsed_by(parse: Callable[[Any], Any]) -> str:
    """The function that checks a value, as `name` at `path:line`."""
    name = parse.__qualname__.split(".<locals>")[0]
    try:
        source = Path(inspect.getsourcefile(parse) or "")
        line = inspect.getsourcelines(parse)[1]
    except (OSError, TypeError):  # a builtin such as dict
        return f"{name} (Python's builtin)"
    try:
        where = source.resolve().relative_to(ROOT)
    except ValueError:
        where = source
    return f"{parse.__module__}.{name} at {where}:{line}"


def who_may_set(row: Reference) -> list[str]:
    """How each author the setting allows writes it, in `WHO`'s order."""
    name = row.setting.name
    config = (
        f"`c.GVisorProvisioner.{name}`, `c.MicroVMProvisioner.{name}` "
        f"(`c.SandboxProvisioner.{name}` for both)"
        if row.scope in COMMON_SCOPES
        else f"`{name}` of the {row.scope} backend's provisioner"
    )
    return [WHO[who].format(name=name, config=config) for who in WHO if who in row.setting.who]


def bounded(setting: Setting) -> str:
    """Whether and how the operator's policy bounds the setting."""
    if settings.POLICY in setting.who:
        return "set by the policy file alone"
    if setting.bounded:
        return "yes: the policy's value is a ceiling; anyone else may ask for less, not more"
    return "no"


def anchor(row: Reference) -> str:
    """The row's label, which other pages link to (`[memory_limit](#setting-memory_limit)`):
    setting-NAME, or setting-BACKEND-NAME for a backend's own."""
    if row.scope in COMMON_SCOPES:
        return f"setting-{row.setting.name}"
    return f"setting-{row.scope}-{row.setting.name}"


def text(value: str) -> list[nodes.Node]:
    """`value` with its `backquoted` parts as literals."""
    parts = value.split("`")
    return [
        nodes.literal(part, part) if i % 2 else nodes.Text(part)
        for i, part in enumerate(parts)
        if part
    ]


def table(
    header: Iterable[tuple[str, int]], rows: Iterable[Iterable[list[nodes.Node]]]
) -> nodes.table:
    """A table of `header`'s (title, relative width) columns."""
    header = list(header)
    group = nodes.tgroup(cols=len(header))
    group += [nodes.colspec(colwidth=width) for _, width in header]
    head = nodes.thead()
    head += _row([[nodes.Text(title)] for title, _ in header])
    body = nodes.tbody()
    body += [_row(cells) for cells in rows]
    group += [head, body]
    result = nodes.table(classes=["settings-summary"])
    result += group
    return result


def _row(cells: Iterable[list[nodes.Node]]) -> nodes.row:
    row = nodes.row()
    for content in cells:
        entry = nodes.entry()
        paragraph = nodes.paragraph()
        paragraph += content
        entry += paragraph
        row += entry
    return row


def field_list(fields: Iterable[tuple[str, list[nodes.Node]]]) -> nodes.field_list:
    """A definition-style list of (name, content) fields: one setting's facts."""
    result = nodes.field_list()
    for name, body in fields:
        field = nodes.field()
        field += nodes.field_name(name, name)
        paragraph = nodes.paragraph()
        paragraph += body
        content = nodes.field_body()
        content += paragraph
        field += content
        result += field
    return result


def literal(value: str) -> list[nodes.Node]:
    """`value` as inline code."""
    return [nodes.literal(value, value)]


class SettingsReference(SphinxDirective):
    """`settings-reference`: the summary table and one section per setting."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        rows = settings.reference(backend_settings())
        found = declarations()
        self.env.note_dependency(str(PACKAGE / "settings.py"))
        for path, _ in (p for places in found.values() for p in places):
            self.env.note_dependency(str(ROOT / path))
        summary = table(
            [
                ("Setting", 20),
                ("Scope", 14),
                ("Default", 20),
                ("Who may set it", 26),
                ("Bounded by the policy", 10),
            ],
            (
                [
                    [_link(row)],
                    [nodes.Text(row.scope)],
                    literal(row.default),
                    [nodes.Text(", ".join(w for w in WHO if w in row.setting.who))],
                    [nodes.Text("yes" if row.setting.bounded else "no")],
                ]
                for row in rows
            ),
        )
        return [summary, *(self.section(row, found) for row in rows)]

    def section(self, row: Reference, found: dict[str, list[tuple[str, int]]]) -> nodes.section:
        setting = row.setting
        label = anchor(row)
        section = nodes.section(ids=[nodes.make_id(label)], names=[label])
        title = nodes.title()
        title += nodes.literal(setting.name, setting.name)
        if row.scope not in COMMON_SCOPES:
            title += nodes.Text(f" ({row.scope})")
        section += title
        self.state.document.note_explicit_target(section, section)
        help_text = nodes.paragraph()
        help_text += text(setting.help)
        section += help_text
        fields: list[tuple[str, list[nodes.Node]]] = [
            ("Type", [nodes.Text(setting.kind)]),
            ("Default", literal(row.default)),
        ]
        if setting.choices:
            fields.append(("Choices", text(", ".join(f"`{c}`" for c in setting.choices))))
        if setting.example:
            fields.append(("Example", literal(setting.example)))
        declared = declared_at(row, found)
        if not declared:  # a reader must find it from this page: fail the build (-W)
            LOG.warning(
                "setting %s (%s): no `Setting(%r, ...)` found in provisioner/",
                setting.name,
                row.scope,
                setting.name,
                location=self.get_location(),
            )
        fields += [
            ("Scope", [nodes.Text(row.scope)]),
            ("Who may set it", text("; ".join(who_may_set(row)))),
            ("Bounded by the policy", [nodes.Text(bounded(setting))]),
            ("Declared in", literal(declared or "?")),
            ("Parsed by", literal(parsed_by(setting.parse))),
            ("Enforced in", text(setting.enforced)),
        ]
        section += field_list(fields)
        return section


def _link(row: Reference) -> nodes.Node:
    reference = nodes.reference("", "", refid=nodes.make_id(anchor(row)))
    reference += nodes.literal(row.setting.name, row.setting.name)
    return reference


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("settings-reference", SettingsReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
