#!/usr/bin/env bash
# The MCP server the tests talk to: the official MCP Python SDK (PyPI `mcp`) in a virtualenv
# cached outside the repo, running hack/mcp_server.py.
#
#   hack/mcp-peer.sh install   creates ${VOLT_CACHE_DIR:-~/.cache/volt-operator}/mcp-venv
#                              with the pinned `mcp` (a second run does nothing)
#   hack/mcp-peer.sh python    prints the virtualenv's python
set -euo pipefail

CACHE_DIR=${VOLT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/volt-operator}
VENV=$CACHE_DIR/mcp-venv
MCP_VERSION=2.3.0

case "${1:-install}" in
  install)
    if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c "import mcp.server.mcpserver" 2>/dev/null; then
      exit 0
    fi
    mkdir -p "$CACHE_DIR"
    # Several test processes may race here: one installs, the others wait.
    exec 9>"$CACHE_DIR/mcp-venv.lock"
    flock 9
    if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c "import mcp.server.mcpserver" 2>/dev/null; then
      exit 0
    fi
    printf '[mcp-peer] installing mcp==%s into %s\n' "$MCP_VERSION" "$VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "mcp==$MCP_VERSION"
    ;;
  python) echo "$VENV/bin/python" ;;
  *) echo "usage: $0 [install|python]" >&2; exit 2 ;;
esac
