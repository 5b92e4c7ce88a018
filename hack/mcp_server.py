"""The MCP server of the tests: the official MCP Python SDK over streamable HTTP on loopback.

    python hack/mcp_server.py --host 127.0.0.1 --port 8765 [--require-header NAME=VALUE]

Tools: search_docs (text), add (structured), fail (a tool error), huge (a result of n bytes),
hang (never answers), whoami (echoes the request's Authorization header, as a careless tool
might). With --require-header, every tool call whose request lacks the header fails; the
server counts calls and prints one line per call on stdout (`CALL <tool> auth=<ok|missing>`),
after a line with the traceparent of the call's `_meta` (`TRACE <tool> <traceparent or ->`).
"""

import argparse
import asyncio
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--require-header", default="")
args = parser.parse_args()

required = tuple(args.require_header.split("=", 1)) if args.require_header else None

server = MCPServer("volt-test-tools")


def headers_of(ctx: Context) -> dict:
    request = getattr(ctx.request_context, "request", None)
    headers = getattr(request, "headers", None) or {}
    return {k.lower(): v for k, v in headers.items()}


def traceparent_of(ctx: Context) -> str:
    """The W3C traceparent in the request's `_meta` (MCP SEP-414), or "-"."""
    rc = ctx.request_context
    meta = getattr(rc, "meta", None)
    if isinstance(meta, dict):
        value = meta.get("traceparent")
    else:
        value = getattr(meta, "traceparent", None) or (getattr(meta, "model_extra", None) or {}).get("traceparent")
    if not value:
        params = getattr(rc, "params", None) or {}
        value = (params.get("_meta") or {}).get("traceparent")
    return value or "-"


def check(ctx: Context, tool: str) -> None:
    print(f"TRACE {tool} {traceparent_of(ctx)}", flush=True)
    ok = True
    if required:
        ok = headers_of(ctx).get(required[0].lower()) == required[1]
    print(f"CALL {tool} auth={'ok' if ok else 'missing'}", flush=True)
    if not ok:
        raise ValueError("unauthorized: the required header is missing")


@server.tool()
def search_docs(query: str, ctx: Context) -> str:
    """Search the volt-operator documentation."""
    check(ctx, "search_docs")
    return f"docs for {query}: transcripts are read with kubectl volt logs"


@server.tool()
def add(a: int, b: int, ctx: Context) -> int:
    """Add two integers."""
    check(ctx, "add")
    return a + b


@server.tool()
def fail(reason: str, ctx: Context) -> str:
    """Always fails."""
    check(ctx, "fail")
    # A ToolError's message reaches the client; other exceptions become "Error executing tool".
    raise ToolError(f"tool failed on purpose: {reason}")


@server.tool()
def huge(n: int, ctx: Context) -> str:
    """Returns n bytes."""
    check(ctx, "huge")
    return "x" * n


@server.tool()
async def hang(ctx: Context) -> str:
    """Never answers."""
    check(ctx, "hang")
    await asyncio.sleep(3600)
    return "late"


@server.tool()
def whoami(ctx: Context) -> str:
    """Echoes the Authorization header."""
    check(ctx, "whoami")
    return "you sent: " + headers_of(ctx).get("authorization", "nothing")


print(f"READY {args.host}:{args.port}", file=sys.stderr, flush=True)
server.run(transport="streamable-http", host=args.host, port=args.port)
