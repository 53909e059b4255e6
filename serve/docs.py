"""``/docs``: the API reference rendered from the app's OpenAPI document, as one self-contained HTML page.

FastAPI's Swagger UI and ReDoc pages load their scripts from a CDN, which the machines that serve re2g
cannot reach; this page needs nothing but itself. Each operation shows its method and path, its
description, the request body's fields (type, required, limits, default, description), the responses
(a ``text/event-stream`` response with its events: name, payload, description), and ``curl`` examples.
The raw document is at ``/openapi.json``.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

EXAMPLES = {
    "/v1/answer": {"query": "Broushan Stovelain [SEP] place of birth", "n_docs": 3},
    "/v1/answer:batch": {"queries": ["Broushan Stovelain [SEP] place of birth",
                                     "Broushan Stovelain [SEP] occupation"]},
    "/v1/retrieve": {"query": "Broushan Stovelain [SEP] place of birth", "top_k": 5},
    "/v1/rerank": {"query": "where was Broushan Stovelain born?",
                   "passages": [{"title": "Broushan Stovelain", "text": "Broushan Stovelain was born in ..."},
                                {"text": "An unrelated passage."}]},
}
STREAM_EXAMPLES = {     # curl -N: print each event as it arrives
    "/v1/answer": {"query": "Broushan Stovelain [SEP] place of birth", "n_docs": 3, "stream": True},
}


def _ref(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = doc.get("components", {}).get("schemas", {}).get(name, {})
    return schema


def _type(doc: dict, schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(doc, s) for s in schema["anyOf"])
    t = schema.get("type", "any")
    if t == "array":
        return f"array of {_type(doc, schema.get('items', {}))}"
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    return str(t)


LIMIT_KEYS = (("minimum", ">="), ("ge", ">="), ("exclusiveMinimum", ">"), ("gt", ">"), ("maximum", "<="),
              ("le", "<="), ("exclusiveMaximum", "<"), ("lt", "<"), ("minLength", "length >="),
              ("maxLength", "length <="), ("minItems", "items >="), ("maxItems", "items <="))


def _limits(schema: dict) -> str:
    parts: list[str] = []

    def walk(s: dict) -> None:
        for key, sym in LIMIT_KEYS:
            if key in s:
                v = s[key]
                parts.append(f"{sym} {int(v) if isinstance(v, float) and v.is_integer() else v}")
        for sub in s.get("anyOf", []):
            walk(sub)

    walk(schema)
    return ", ".join(dict.fromkeys(parts))


def _text(s: str) -> str:
    """Escaped text with ``code`` spans."""
    return re.sub(r"``(.+?)``", r"<code>\1</code>", html.escape(s))


def _fields_table(doc: dict, schema: dict) -> str:
    schema = _ref(doc, schema)
    props = schema.get("properties", {})
    if not props:
        return ""
    required = set(schema.get("required", []))
    rows = []
    for name, p in props.items():
        default = "" if "default" not in p else json.dumps(p["default"])
        rows.append("<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(name), " <b>required</b>" if name in required else "", html.escape(_type(doc, p)),
            html.escape(_limits(p)), html.escape(default), _text(p.get("description", ""))))
    return ("<table><thead><tr><th>field</th><th>type</th><th>limits</th><th>default</th><th>description</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _events(doc: dict, media: dict) -> str:
    """The events of a ``text/event-stream`` media type (an ``itemSchema`` per event, ``oneOf``)."""
    items = []
    for ev in media.get("itemSchema", {}).get("oneOf", []):
        props = ev.get("properties", {})
        name = props.get("event", {}).get("const", "message")
        data = props.get("data", {}).get("contentSchema")
        if data and "$ref" in data:
            kind = f" &mdash; <code>{html.escape(_type(doc, data))}</code>"
        elif data and data.get("properties"):      # a small inline object: its fields
            fields = ", ".join(f"{k}: {_type(doc, v)}" for k, v in data["properties"].items())
            kind = f" &mdash; <code>{{{html.escape(fields)}}}</code>"
        else:
            kind = ""
        items.append(f"<li><code>event: {html.escape(str(name))}</code>{kind} {_text(ev.get('description', ''))}</li>")
    return "<ul>" + "".join(items) + "</ul>" if items else ""


def _operation(doc: dict, path: str, method: str, op: dict) -> str:
    out = [f'<section class="op" id="{html.escape(method + path)}"><h2><span class="m {method}">'
           f'{method.upper()}</span> <code>{html.escape(path)}</code> {html.escape(op.get("summary", ""))}</h2>']
    if op.get("description"):
        out.append(f"<p>{_text(op['description'])}</p>")
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if body:
        name = _type(doc, body)
        out.append(f"<h3>Request body: {html.escape(name)}</h3>" + _fields_table(doc, body))
    out.append("<h3>Responses</h3><ul>")
    for code, r in op.get("responses", {}).items():
        schema = r.get("content", {}).get("application/json", {}).get("schema")
        name = f" &mdash; <code>{html.escape(_type(doc, schema))}</code>" if schema else ""
        sse = r.get("content", {}).get("text/event-stream")
        events = "" if sse is None else ("<br>or <code>text/event-stream</code>, one JSON <code>data:</code> line "
                                         "per event:" + _events(doc, sse))
        out.append(f"<li><b>{html.escape(str(code))}</b> {html.escape(r.get('description', ''))}{name}{events}</li>")
    out.append("</ul>")
    if path in EXAMPLES:
        ex = json.dumps(EXAMPLES[path])
        out.append(f"<pre>curl -s localhost:8000{html.escape(path)} -d '{html.escape(ex)}'")
        if path in STREAM_EXAMPLES:
            ex = json.dumps(STREAM_EXAMPLES[path])
            out.append(f"\ncurl -sN localhost:8000{html.escape(path)} -d '{html.escape(ex)}'")
        out.append("</pre>")
    elif method == "get":
        out.append(f"<pre>curl -s localhost:8000{html.escape(path)}</pre>")
    out.append("</section>")
    return "".join(out)


def _models(doc: dict) -> str:
    out = []
    for name, schema in sorted(doc.get("components", {}).get("schemas", {}).items()):
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        desc = html.escape(schema.get("description", "") or "")
        out.append(f'<section class="model" id="model-{html.escape(name)}"><h3>{html.escape(name)}</h3>'
                   f"<p>{desc}</p>{_fields_table(doc, schema)}</section>")
    return "".join(out)


CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1000px;margin:0 auto;padding:16px}
h1{margin:8px 0}h2{font-size:18px;margin:0 0 8px}h3{font-size:15px;margin:14px 0 6px}
.op,.model{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 16px;margin:14px 0}
.m{display:inline-block;border-radius:4px;padding:1px 8px;color:#fff;font-size:13px}
.post{background:#1a7f37}.get{background:#0969da}
table{border-collapse:collapse;width:100%;font-size:13px;display:block;overflow-x:auto}
td,th{border-top:1px solid #d0d7de;padding:4px 6px;text-align:left;vertical-align:top}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:8px;overflow-x:auto;font-size:13px}
code{font-size:13px}
"""


def render_docs(doc: dict[str, Any]) -> str:
    """The HTML page for an OpenAPI document (``app.openapi()``)."""
    ops = []
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method in ("get", "post", "put", "delete", "patch"):
                ops.append(_operation(doc, path, method, op))
    info = doc.get("info", {})
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>{html.escape(info.get('title', 'API'))} API</title><style>{CSS}</style></head><body><main>"
            f"<h1>{html.escape(info.get('title', 'API'))} API</h1><p>{html.escape(info.get('description', ''))}</p>"
            '<p>OpenAPI document: <a href="openapi.json">openapi.json</a> &middot; web page: <a href="./">/</a>. '
            "Errors are JSON: <code>{error, message, errors: [{field, reason}]}</code>.</p>"
            + "".join(ops) + "<h2>Schemas</h2>" + _models(doc) + "</main></body></html>")
