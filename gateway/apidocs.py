"""``/schema``: the API reference as one server-rendered HTML page, read from the app's
own OpenAPI schema.

Litestar's UIs (ReDoc, Swagger, Scalar, ...) load their JavaScript from a CDN, so on a
machine without internet ``/schema`` was a blank page. This page needs nothing but the
gateway: no script, no external stylesheet, font or favicon; every link stays on the
page or points at ``/schema/openapi.json`` (served by Litestar beside it).
"""

from __future__ import annotations

from collections.abc import Iterator
from html import escape
from typing import Any

import msgspec
from litestar import Request
from litestar.enums import MediaType
from litestar.openapi.plugins import OpenAPIRenderPlugin

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
REF_PREFIX = "#/components/schemas/"
# JSON Schema keywords shown as a property's constraints, in this order.
CONSTRAINTS = (
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "default",
)
STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 70em; padding: 1em 2em;
       color: #1b1f24; }
h2 { border-bottom: 1px solid #d0d7de; margin-top: 2em; }
h3 { margin-bottom: .3em; }
code, .method { font-family: ui-monospace, monospace; }
.method { display: inline-block; min-width: 4.5em; font-weight: bold; }
table { border-collapse: collapse; margin: .4em 0 1em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
ul.toc { list-style: none; padding-left: 0; }
"""


class OfflineDocsPlugin(OpenAPIRenderPlugin):
    """Renders the OpenAPI schema as a static HTML reference (paths, methods, summaries,
    parameters, request and response schemas, and every schema's fields)."""

    def __init__(self, *, path: str = "/") -> None:
        # No favicon: Litestar's default one is fetched from a CDN.
        super().__init__(path=path, media_type=MediaType.HTML, favicon="", style="")

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The whole page for ``openapi_schema``."""
        return render_page(openapi_schema, self.get_openapi_json_route(request)).encode()


def render_page(schema: dict[str, Any], json_url: str) -> str:
    """The reference page for an OpenAPI schema (as a dict); ``json_url`` is the path of
    the same schema as JSON."""
    info = schema.get("info", {})
    title = escape(str(info.get("title", "API")))
    version = escape(str(info.get("version", "")))
    operations = list(_operations(schema.get("paths", {})))
    components = schema.get("components", {}).get("schemas", {})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{title} {version}</title><style>{STYLE}</style></head><body>",
        f"<h1>{title} <small>{version}</small></h1>",
        f"<p>OpenAPI {escape(str(schema.get('openapi', '')))} schema as JSON: "
        f'<a href="{escape(json_url)}">{escape(json_url)}</a>. Routes marked '
        "<em>bearer</em> need <code>Authorization: Bearer &lt;key&gt;</code>.</p>",
        '<h2 id="routes">Routes</h2><ul class="toc">',
        *(
            f'<li><a href="#{anchor}"><span class="method">{method.upper()}</span> '
            f"<code>{escape(path)}</code></a> {escape(str(operation.get('summary', '')))}</li>"
            for method, path, operation, anchor in operations
        ),
        "</ul>",
        *(
            _operation(method, path, operation, anchor)
            for method, path, operation, anchor in operations
        ),
        '<h2 id="schemas">Schemas</h2>',
        *(_component(name, node) for name, node in components.items()),
        "</body></html>",
    ]
    return "\n".join(parts)


def _operations(paths: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any], str]]:
    for path, item in paths.items():
        for method in METHODS:
            if isinstance(operation := item.get(method), dict):
                yield method, path, operation, _anchor("op", method, path)


def _anchor(*words: str) -> str:
    return "-".join("".join(c if c.isalnum() else "-" for c in word) for word in words)


def _operation(method: str, path: str, operation: dict[str, Any], anchor: str) -> str:
    parts = [
        f'<h3 id="{anchor}"><span class="method">{method.upper()}</span> '
        f"<code>{escape(path)}</code></h3>",
        f"<p>{escape(str(operation.get('summary', '')))}"
        + (" <em>(bearer)</em>" if operation.get("security") else "")
        + "</p>",
    ]
    if description := operation.get("description"):
        parts.append(f"<p>{escape(str(description))}</p>")
    if parameters := operation.get("parameters"):
        parts.append("<table><tr><th>Parameter</th><th>In</th><th>Type</th><th>Required</th></tr>")
        parts += [
            f"<tr><td><code>{escape(str(p.get('name', '')))}</code></td>"
            f"<td>{escape(str(p.get('in', '')))}</td><td>{_type(p.get('schema', {}))}</td>"
            f"<td>{'yes' if p.get('required') else 'no'}</td></tr>"
            for p in parameters
        ]
        parts.append("</table>")
    if body := operation.get("requestBody"):
        parts.append("<p>Request body: " + _content(body.get("content", {})) + "</p>")
    parts.append("<table><tr><th>Status</th><th>Meaning</th><th>Body</th><th>Headers</th></tr>")
    for status, response in operation.get("responses", {}).items():
        headers = ", ".join(f"<code>{escape(name)}</code>" for name in response.get("headers", {}))
        parts.append(
            f"<tr><td>{escape(str(status))}</td>"
            f"<td>{escape(str(response.get('description', '')))}</td>"
            f"<td>{_content(response.get('content', {}))}</td><td>{headers}</td></tr>"
        )
    parts.append("</table>")
    return "\n".join(parts)


def _content(content: dict[str, Any]) -> str:
    return "; ".join(
        f"<code>{escape(media)}</code> {_type(entry.get('schema', {}))}"
        for media, entry in content.items()
    )


def _component(name: str, node: dict[str, Any]) -> str:
    parts = [f'<h3 id="{_anchor("schema", name)}">{escape(name)}</h3>']
    if description := node.get("description"):
        parts.append(f"<p>{escape(str(description))}</p>")
    properties = node.get("properties")
    if not properties:
        parts.append(f"<p>{_type(node)}</p>")
        return "\n".join(parts)
    required = set(node.get("required", ()))
    parts.append(
        "<table><tr><th>Field</th><th>Type</th><th>Required</th><th>Constraints</th>"
        "<th>Description</th></tr>"
    )
    parts += [
        f"<tr><td><code>{escape(field)}</code></td><td>{_type(sub)}</td>"
        f"<td>{'yes' if field in required else 'no'}</td><td>{_constraints(sub)}</td>"
        f"<td>{escape(str(sub.get('description', '')))}</td></tr>"
        for field, sub in properties.items()
    ]
    parts.append("</table>")
    return "\n".join(parts)


def _type(node: Any) -> str:
    """A schema node as a short type expression; references link to their schema."""
    if not isinstance(node, dict) or not node:
        return "any"
    if isinstance(ref := node.get("$ref"), str):
        name = ref.removeprefix(REF_PREFIX)
        return f'<a href="#{_anchor("schema", name)}">{escape(name)}</a>'
    for union in ("anyOf", "oneOf"):
        if union in node:
            return " | ".join(_type(sub) for sub in node[union])
    if "enum" in node:
        return " | ".join(f"<code>{_json(value)}</code>" for value in node["enum"])
    if "const" in node:
        return f"<code>{_json(node['const'])}</code>"
    kinds = node.get("type", "any")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    shown = []
    for kind in kinds:
        if kind == "array":
            shown.append(f"array[{_type(node.get('items'))}]")
        elif kind == "object" and isinstance(extra := node.get("additionalProperties"), dict):
            shown.append(f"object[string, {_type(extra)}]")
        else:
            text = escape(str(kind))
            shown.append(f"{text} ({escape(str(node['format']))})" if "format" in node else text)
    return " | ".join(shown)


def _constraints(node: dict[str, Any]) -> str:
    """The value constraints of a property, those of its union members included."""
    members = [node, *node.get("anyOf", ()), *node.get("oneOf", ())]
    return ", ".join(
        f"{escape(key)}: <code>{_json(member[key])}</code>"
        for member in members
        if isinstance(member, dict)
        for key in CONSTRAINTS
        if key in member
    )


def _json(value: Any) -> str:
    return escape(msgspec.json.encode(value).decode())
