"""Drives the operator's web view in headless Chromium (Playwright for Python, the system
Chromium) for tests/e2e/web_view_browser.rs. One JSON argument says what to do; one JSON line
on stdout says what was seen; the Rust test asserts on it. Screenshots go to `shots`.

Modes:
  flows  the login page without a token; a caller without rights refused; the run list; the
         run page of a gated run coloured by phase, changing colour live as the approval is
         clicked through and the last step finishes (screenshots, pixel colours).
  bench  the run page of a big run: time to the full picture (from opening the page, after
         sign-in, to the picture drawn: the stream's first event included) and of drawing it
         alone, and the longest gap between animation frames while the run updates.
"""

import json
import sys
import time

from PIL import Image
from playwright.sync_api import sync_playwright

# The colours of app.js.
COLOURS = {
    "None": "#eef0f3", "Pending": "#d0d4da", "Running": "#3b82f6", "Retrying": "#f59e0b",
    "Waiting": "#a855f7", "Succeeded": "#22c55e", "Failed": "#ef4444", "Skipped": "#9ca3af",
    "Cancelled": "#6b7280",
}


def rgb(hex_colour):
    h = hex_colour.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def near(a, b, tolerance=12):
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


def sign_in(page, base, token):
    page.goto(base + "/ui")
    page.evaluate("t => sessionStorage.setItem('volt-token', t)", token)


def node_pixel(page, shot_path, key):
    """The colour of node `key` in a fresh screenshot, sampled inside its box near the
    bottom-left corner (away from the label)."""
    node = page.locator(f'g.node[data-key="{key}"] rect.box')
    node.scroll_into_view_if_needed()
    box = node.bounding_box()
    page.screenshot(path=shot_path)
    img = Image.open(shot_path).convert("RGB")
    x, y = int(box["x"] + 5), int(box["y"] + box["height"] - 5)
    return img.getpixel((x, y))


def wait_fill(page, key, colour, timeout_ms):
    page.wait_for_function(
        "([k, c]) => { const r = document.querySelector(`g.node[data-key=\"${k}\"] rect.box`);"
        " return r && r.getAttribute('fill') === c; }",
        arg=[key, colour], timeout=timeout_ms)


def flows(cfg, browser):
    out = {}
    base, shots = cfg["base"], cfg["shots"]
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    # No token: the login page only.
    page.goto(base + "/ui")
    page.wait_for_selector("#login")
    out["login_without_token"] = page.locator("#login").is_visible()
    out["table_without_token"] = page.locator("#runs").count()
    page.screenshot(path=f"{shots}/1-login.png")
    # A bogus token: back to the login page with the cluster's refusal.
    page.fill("#token", "not-a-token")
    page.click("#login-submit")
    page.wait_for_selector("#login-error:has-text('does not accept')")
    out["bogus_token_error"] = page.inner_text("#login-error")
    # A caller without rights: no runs, and the run page refused.
    page.fill("#token", cfg["nobody"])
    page.click("#login-submit")
    page.wait_for_selector("#runs")
    page.wait_for_function("() => document.querySelector('#count').textContent.length > 0")
    out["nobody_rows"] = page.locator("#runs tbody tr").count()
    page.goto(f"{base}/ui#/runs/{cfg['namespace']}/{cfg['run']}")
    page.wait_for_selector("#page-error")
    out["nobody_run_error"] = page.inner_text("#page-error")
    page.screenshot(path=f"{shots}/2-refused.png")
    ctx.close()

    # A reader: the run list.
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    sign_in(page, base, cfg["reader"])
    page.goto(base + "/ui#/")
    row = f'#runs tr[data-run="{cfg["namespace"]}/{cfg["run"]}"]'
    page.wait_for_selector(row, timeout=30000)
    out["reader_row"] = page.inner_text(row)
    page.screenshot(path=f"{shots}/3-list.png")
    ctx.close()

    # An approver: the run page, coloured live.
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    sign_in(page, base, cfg["approver"])
    page.goto(f"{base}/ui#/runs/{cfg['namespace']}/{cfg['run']}")
    page.wait_for_selector("svg#dag")
    wait_fill(page, "gate", COLOURS["Waiting"], 30000)
    out["before"] = {k: node_pixel(page, f"{shots}/4-waiting.png", k) for k in ("plan", "fan", "gate", "ship")}
    page.click('g.node[data-key="gate"]')
    page.wait_for_selector("#approve")
    page.fill("#comment", "clicked in the browser")
    page.click("#approve")
    page.wait_for_selector("#decided")
    wait_fill(page, "ship", COLOURS["Succeeded"], 30000)
    out["after"] = {k: node_pixel(page, f"{shots}/5-finished.png", k) for k in ("gate", "ship")}
    out["reloaded"] = page.evaluate("performance.getEntriesByType('navigation').length")
    out["head_phase"] = page.get_attribute("#runhead", "data-phase")
    ctx.close()
    out["colours"] = {k: rgb(v) for k, v in COLOURS.items()}
    out["match"] = {
        "before": {k: near(tuple(v), rgb(COLOURS[p])) for (k, v), p in
                   zip(out["before"].items(), ["Succeeded", "Succeeded", "Waiting", "None"])},
        "after": {k: near(tuple(v), rgb(COLOURS["Succeeded"])) for k, v in out["after"].items()},
    }
    return out


def bench(cfg, browser):
    out = {}
    base = cfg["base"]
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    page = ctx.new_page()
    sign_in(page, base, cfg["token"])
    # First while the run is running: the picture, then its updates until the run ends.
    page.goto(f"{base}/ui#/runs/{cfg['namespace']}/{cfg['run']}")
    page.wait_for_selector("body[data-rendered=true]", timeout=60000)
    out["render_running_ms"] = page.evaluate("window.voltRenderMs")
    out["draw_running_ms"] = page.evaluate("window.voltDrawMs")
    out["nodes"] = page.locator("g.node").count()
    out["phase_at_render"] = page.get_attribute("#runhead", "data-phase")
    # Frame gaps from now on: the longest one says how long the page froze while updating.
    # And the page's own long tasks (main-thread work over 50 ms): a frame gap without one is
    # the machine's CPU, not the page.
    page.evaluate("""() => {
      window.voltGaps = []; let last = performance.now();
      const tick = t => { window.voltGaps.push(t - last); last = t; requestAnimationFrame(tick); };
      requestAnimationFrame(tick);
      window.voltLongTasks = [];
      new PerformanceObserver(l => { for (const e of l.getEntries()) window.voltLongTasks.push(e.duration); })
        .observe({type: "longtask"});
    }""")
    started = time.time()
    # (functions, not expressions: the page's Content-Security-Policy forbids eval)
    page.wait_for_function("() => document.querySelector('#runhead')?.dataset.phase === 'Succeeded'",
                           timeout=cfg.get("update_ms", 300000))
    out["updating_s"] = time.time() - started
    gaps = page.evaluate("window.voltGaps")
    gaps.sort()
    out["frames"] = len(gaps)
    out["max_gap_ms"] = gaps[-1] if gaps else None
    out["p99_gap_ms"] = gaps[max(0, int(len(gaps) * 0.99) - 1)] if gaps else None
    paints = sorted(page.evaluate("() => window.voltPaintMs || []"))
    out["updates"] = len(paints)
    out["max_update_ms"] = paints[-1] if paints else None
    out["p50_update_ms"] = paints[len(paints) // 2] if paints else None
    long_tasks = page.evaluate("() => window.voltLongTasks")
    out["long_tasks"] = len(long_tasks)
    out["max_long_task_ms"] = max(long_tasks) if long_tasks else 0
    out["green_nodes"] = page.locator('g.node rect.box[fill="#22c55e"]').count()
    # Then the finished run, loaded afresh a few times.
    renders, draws = [], []
    for _ in range(cfg.get("repeat", 3)):
        page.reload()
        page.wait_for_selector("body[data-rendered=true]", timeout=60000)
        renders.append(page.evaluate("window.voltRenderMs"))
        draws.append(page.evaluate("window.voltDrawMs"))
    out["render_ms"] = renders
    out["draw_ms"] = draws
    # A click answers while it updates: time to open a step's panel.
    t = time.time()
    page.click('g.node >> nth=0')
    page.wait_for_selector("aside#panel h2")
    out["panel_ms"] = (time.time() - t) * 1000
    page.screenshot(path=f"{cfg['shots']}/bench.png")
    ctx.close()
    return out


def main():
    cfg = json.loads(sys.argv[1])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=cfg["chromium"], args=["--no-sandbox"])
        try:
            result = flows(cfg, browser) if cfg["mode"] == "flows" else bench(cfg, browser)
        except Exception as e:  # the Rust test prints it
            result = {"error": f"{type(e).__name__}: {e}"}
        browser.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
