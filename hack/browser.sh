#!/usr/bin/env bash
# The headless browser the web view's tests drive: Debian's Chromium (apt package `chromium`)
# and Playwright for Python (PyPI, pinned) in a virtualenv cached outside the repo, pointed at
# that Chromium (Playwright downloads no browser of its own), with Pillow to read screenshots.
#
#   hack/browser.sh install    installs chromium (as root, with apt-get) and creates
#                              ${VOLT_CACHE_DIR:-~/.cache/volt-operator}/browser-venv
#                              (a second run does nothing)
#   hack/browser.sh python     prints the virtualenv's python
#   hack/browser.sh chromium   prints the Chromium binary, or fails if there is none
set -euo pipefail

CACHE_DIR=${VOLT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/volt-operator}
VENV=$CACHE_DIR/browser-venv
PLAYWRIGHT_VERSION=1.65.2
PILLOW_VERSION=13.0.0

chromium_bin() {
  for c in "${VOLT_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [[ -n $c && -x $c ]]; then echo "$c"; return 0; fi
  done
  return 1
}

venv_ok() {
  [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c "import playwright.sync_api, PIL" 2>/dev/null
}

case "${1:-install}" in
  install)
    if ! chromium_bin >/dev/null; then
      if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        printf '[browser] installing chromium with apt-get\n' >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
      else
        printf '[browser] no chromium, and not root with apt-get: install the Debian package chromium\n' >&2
      fi
    fi
    venv_ok && exit 0
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/browser-venv.lock"
    flock 9
    venv_ok && exit 0
    printf '[browser] installing playwright==%s pillow==%s into %s\n' "$PLAYWRIGHT_VERSION" "$PILLOW_VERSION" "$VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "playwright==$PLAYWRIGHT_VERSION" "pillow==$PILLOW_VERSION"
    ;;
  python) echo "$VENV/bin/python" ;;
  chromium) chromium_bin ;;
  *) echo "usage: $0 [install|python|chromium]" >&2; exit 2 ;;
esac
