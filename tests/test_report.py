"""The HTML report: a real scan's report opened in headless Chromium, runs without ground truth,
inverted triggers from the `triggers` table, and the drill-down cap of large runs.

Chromium is Debian's `chromium`, which `make test` installs (`make system-deps`, as root with
apt-get); where it is absent the browser test is skipped with the reason. The browser is driven
over the DevTools protocol (aiohttp's websocket client): every request the page makes is
recorded, the images are checked as decoded by the browser, and a full-page screenshot is kept
at tests/_output/report/report.png for people to look at.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from typing import Any
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xray.reduce.report import render_report, select_drilldown
from xray.reduce.summary import load_scores, unit_frames
from xray.results.schema import SCORES
from xray.results.sink import write_part

OUTPUT = Path(__file__).resolve().parent / "_output" / "report"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-default-apps", "--mute-audio", "--hide-scrollbars"]


# ---------------------------------------------------------------------------------------------
# Chromium


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of Debian's chromium; the test skips where it is absent (no test installs it)."""
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("Debian's chromium is not on PATH: `make system-deps` installs it (root, "
                    "apt-get)")
    return found


class _Page:
    """A minimal DevTools-protocol client for one page target."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    async def call(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    async def wait_for(self, method: str, timeout: float = 120) -> dict:
        for event in self.events:
            if event["method"] == method:
                return event
        while True:
            message = await self.ws.receive_json(timeout=timeout)
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return message


_PAGE_CHECKS = """(() => {
  const decoded = img => img.complete && img.naturalWidth > 0;
  const roc = document.querySelector('#roc-plot');
  const drills = [...document.querySelectorAll('section.drill')].map(s => ({
    id: s.dataset.modelId, truth: s.dataset.truth,
    planes: [...s.querySelectorAll('img.planes')].map(decoded),
    triggers: [...s.querySelectorAll('img.triggers')].map(decoded),
    text: s.innerText}));
  return JSON.stringify({
    title: document.title,
    roc: roc ? decoded(roc) : null,
    images: [...document.images].length,
    broken: [...document.images].filter(i => !decoded(i)).length,
    external: [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') ||
        e.getAttribute('href')).filter(u => !u.startsWith('data:') && !u.startsWith('#')),
    drills: drills,
    height: document.documentElement.scrollHeight});
})()"""


@contextlib.asynccontextmanager
async def _browser_page(chromium: str):
    """A fresh headless Chromium (own profile) and its page's DevTools client."""
    import aiohttp

    profile = tempfile.mkdtemp(prefix="xray-chromium-")
    proc = await asyncio.create_subprocess_exec(
        chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
        "--window-size=1400,1000", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        endpoint = None
        while endpoint is None:
            line = await asyncio.wait_for(proc.stderr.readline(), timeout=120)
            if not line:
                raise RuntimeError("chromium exited before opening its DevTools endpoint")
            found = re.search(rb"DevTools listening on (ws://\S+)", line)
            if found:
                endpoint = found.group(1).decode()
        port = re.search(r":(\d+)/", endpoint).group(1)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(page_ws, max_msg_size=0) as ws:
                page = _Page(ws)
                for domain in ("Page", "Network", "Runtime", "Log"):
                    await page.call(f"{domain}.enable")
                yield page
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except asyncio.TimeoutError:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


async def _evaluate(page: _Page, expression: str):
    return json.loads((await page.call("Runtime.evaluate", expression=expression,
                                       returnByValue=True))["result"]["value"])


async def _inspect(chromium: str, url: str, screenshot: Path) -> dict:
    async with _browser_page(chromium) as page:
        navigated = await page.call("Page.navigate", url=url)
        assert "errorText" not in navigated, navigated
        await page.wait_for("Page.loadEventFired")
        checks = await _evaluate(page, _PAGE_CHECKS)
        width = 1400
        height = min(int(checks["height"]), 16000)
        await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        shot = await page.call("Page.captureScreenshot", format="png",
                               captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        events = page.events
    requests = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in events if e["method"] == "Network.requestWillBeSent"}
    failed = [(requests.get(e["params"]["requestId"]), e["params"].get("errorText"))
              for e in events if e["method"] == "Network.loadingFailed"]
    bad_status = [(e["params"]["response"]["url"], e["params"]["response"]["status"])
                  for e in events if e["method"] == "Network.responseReceived"
                  and e["params"]["response"].get("status", 200) >= 400]
    exceptions = [e for e in events if e["method"] == "Runtime.exceptionThrown"]
    return {**checks, "requests": list(requests.values()), "failed": failed,
            "bad_status": bad_status, "exceptions": exceptions}


# ---------------------------------------------------------------------------------------------
# The report of a real scan, in a browser


def test_report_of_a_real_scan_in_chromium(scanned_tiny, chromium):
    out, round_dir, _ = scanned_tiny
    OUTPUT.mkdir(parents=True, exist_ok=True)
    html_path = OUTPUT / "report.html"
    written = render_report(str(out), html_path=str(html_path))
    assert written == str(html_path)
    html = html_path.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html

    page = asyncio.run(_inspect(chromium, html_path.as_uri(), OUTPUT / "report.png"))

    # loaded, nothing failed, nothing outside the file itself
    assert page["title"].startswith("xray report")
    assert page["failed"] == [] and page["bad_status"] == [] and page["exceptions"] == []
    assert page["external"] == []
    assert all(u.startswith(("file:", "data:")) for u in page["requests"]), page["requests"]
    assert page["broken"] == 0 and page["images"] >= 4
    assert page["roc"] is True  # the ROC image is there and decodes

    # the drill-down of a trojaned model: planes re-run and drawn, ground-truth trigger shown
    truth = {p.name: json.loads((p / "config.json").read_text())["poisoned"]
             for p in round_dir.iterdir() if (p / "config.json").is_file()}
    drills = {d["id"]: d for d in page["drills"]}
    trojaned = [d for d in drills.values() if d["truth"] == "trojaned"]
    assert trojaned, f"no trojaned model in the drill-down: {sorted(drills)}"
    for d in drills.values():
        assert truth[d["id"]] == (d["truth"] == "trojaned")
    drill = trojaned[0]
    assert drill["planes"] == [True] and drill["triggers"] == [True]
    assert "per-plane RE matches the scan" in drill["text"]
    assert "modelxray" in drill["text"] and "ground truth: {" in drill["text"]

    png = (OUTPUT / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


_LAYOUT = """(() => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  const vw = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('body *')].filter(e => {
    // inside a horizontally scrolling wrapper an element may be wider than the page
    if (e.parentElement && e.parentElement.closest('.scroll')) return false;
    const r = e.getBoundingClientRect();
    return r.width > 0 && r.right > vw + 1;
  }).slice(0, 10).map(e => `${e.tagName}#${e.id}.${e.className} right=${
    Math.round(e.getBoundingClientRect().right)}`);
  return JSON.stringify({
    viewport: vw, scrollWidth: document.documentElement.scrollWidth,
    bodyScrollWidth: document.body.scrollWidth, wide: wide,
    images: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
    height: document.documentElement.scrollHeight});
})()"""


async def _layout_at(chromium: str, url: str, widths: tuple[int, ...],
                     shots: Path) -> dict[int, dict]:
    """The page laid out at each width (a phone's viewport for widths below 800: the viewport
    meta tag decides the layout width there), every <details> opened; a full-page screenshot
    per width at shots/report-<width>.png."""
    found = {}
    async with _browser_page(chromium) as page:
        for width in widths:
            await page.call("Emulation.setDeviceMetricsOverride", width=width, height=1000,
                            deviceScaleFactor=1, mobile=width < 800)
            page.events.clear()
            navigated = await page.call("Page.navigate", url=url)
            assert "errorText" not in navigated, navigated
            await page.wait_for("Page.loadEventFired")
            found[width] = layout = await _evaluate(page, _LAYOUT)
            await page.call("Emulation.setDeviceMetricsOverride", width=width,
                            height=min(int(layout["height"]), 16000), deviceScaleFactor=1,
                            mobile=width < 800)
            shot = await page.call("Page.captureScreenshot", format="png",
                                   captureBeyondViewport=True)
            (shots / f"report-{width}.png").write_bytes(base64.b64decode(shot["data"]))
    return found


def test_report_fits_a_400_px_phone_and_a_1400_px_screen(scanned_tiny, chromium):
    """Nothing but the scrolling table wrappers is wider than the viewport: images shrink, wide
    tables scroll inside their wrapper, the viewport meta tag makes a phone lay the page out at
    its own width. The summary shows its short table, the full one and its glossary in a
    <details>. Screenshots at tests/_output/report/report-{400,1400}.png."""
    out, round_dir, _ = scanned_tiny
    OUTPUT.mkdir(parents=True, exist_ok=True)
    trojaned = next(p.name for p in sorted(round_dir.iterdir())
                    if (p / "config.json").is_file()
                    and json.loads((p / "config.json").read_text())["poisoned"])
    html_path = Path(render_report(str(out), html_path=str(OUTPUT / "report-widths.html"),
                                   drilldown_models=[trojaned], max_drilldown=2, planes=2))
    html = html_path.read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    short = html[html.index('id="summary-short"'):]
    short = short[:short.index("</table>")]
    assert re.findall(r"<th[^>]*>([^<]+)</th>", short) == [
        "detector", "group", "models", "ROC-AUC", "TPR at 5% FPR", "CE", "accuracy"]
    full = html[html.index('<details id="summary-full">'):]
    full = full[:full.index("</details>")]
    columns = re.findall(r"<th[^>]*>([^<]+)</th>", full[full.index('id="summary-table"'):])
    glossary = re.findall(r"<dt>([^<]+)</dt><dd>([^<]+)</dd>", full)
    assert len(columns) > 20 and [t for t, _ in glossary] == columns  # every column explained
    assert all(len(meaning) > 10 for _, meaning in glossary)

    layouts = asyncio.run(_layout_at(chromium, html_path.as_uri(), (1400, 400), OUTPUT))
    for width, layout in layouts.items():
        assert layout["viewport"] == width, layout
        assert layout["scrollWidth"] <= width and layout["bodyScrollWidth"] <= width, layout
        assert layout["wide"] == [], layout
        assert layout["images"] >= 4, layout
    for width in (400, 1400):
        png = (OUTPUT / f"report-{width}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(png[16:20], "big") == width  # IHDR width: nothing spilled over


def test_drilldown_selection_matches_the_verdicts(scanned_tiny):
    out, _, _ = scanned_tiny
    frames = unit_frames(load_scores(str(out)))
    (key, pm, threshold, _, _), = frames
    flagged = set(pm.index[pm["usable"] & (pm["score"] >= threshold)])
    wrong = set(pm.index[pm["usable"] & ((pm["score"] >= threshold) != (pm["y"] == 1))])
    picked, left_out = select_drilldown(frames, max_models=50)
    ids = [m for m, _ in picked]
    assert set(ids) == flagged | wrong and left_out == 0
    assert ids[:len(wrong)] == sorted(wrong)  # misclassified first
    picked, left_out = select_drilldown(frames, max_models=1, forced=["id-00000000"])
    assert [m for m, _ in picked] == ["id-00000000"]
    assert left_out == len(flagged | wrong | {"id-00000000"}) - 1


# ---------------------------------------------------------------------------------------------
# Inverted triggers from the triggers table


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _copy_with_trojaned_model(scanned_tiny, tmp_path: Path) -> tuple[Path, Any, str, dict]:
    """(copy of the scanned output under tmp_path, run summary, id and config.json of the
    round's first trojaned model): tests that add trigger rows work on the copy."""
    out, round_dir, summary = scanned_tiny
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    model_id = next(p.name for p in sorted(round_dir.iterdir())
                    if (p / "config.json").is_file()
                    and json.loads((p / "config.json").read_text())["poisoned"])
    return copy, summary, model_id, json.loads((round_dir / model_id / "config.json").read_text())


def _trigger_row(run_id: str, model_id: str, scored: Any, index: int, target: int, reasr: float,
                 mask: np.ndarray, pattern: np.ndarray) -> dict:
    """A stored modelxray trigger row for `model_id` (digest and config hash of its score row)."""
    return {"run_id": run_id, "model_id": model_id, "model_digest": scored["model_digest"],
            "detector": "modelxray", "config_hash": scored["config_hash"],
            "trigger_index": index, "victim": None, "target": target, "kind": "patch",
            "size": float(mask.sum()), "reasr": reasr, "stats_json": "{}", "mask": _npy(mask),
            "pattern": _npy(pattern), "kernel": None}


def test_report_draws_inverted_triggers(scanned_tiny, tmp_path):
    copy, summary, model_id, config = _copy_with_trojaned_model(scanned_tiny, tmp_path)
    trigger = config["trigger"]
    row = load_scores(str(copy)).query("model_id == @model_id").iloc[0]
    _, h, w = config["input_shape"]
    mask = np.zeros((1, h, w), np.float32)
    mask[0, trigger["row"]:trigger["row"] + trigger["size"],
         trigger["col"]:trigger["col"] + trigger["size"]] = 1.0
    pattern = np.random.default_rng(0).random((3, h, w)).astype(np.float32)
    write_part(str(copy), "triggers", summary.run_id, [
        _trigger_row(summary.run_id, model_id, row, i, target, reasr, mask, pattern)
        for i, (target, reasr) in enumerate([(0, 0.2), (config["target"], 0.95)])])

    html = Path(render_report(str(copy), html_path=str(tmp_path / "r.html"),
                              drilldown_models=[model_id], max_drilldown=1, planes=0)).read_text()
    section = html[html.index(f'id="model-{model_id}"'):]
    section = section[:section.index("</section>")]
    assert 'class="triggers"' in section and "data:image/png;base64," in section
    # both candidates listed, the higher REASR first; the true trigger beside them
    rows = re.findall(r"<tr><td class=\"text\">modelxray</td><td>(\d)</td><td>(\d)</td>", section)
    assert rows == [("1", str(config["target"])), ("0", "0")]
    assert "ground truth: {" in section and '"name": "badnets"' in section.replace("&#34;", '"')
    assert "cannot re-apply" not in section  # each stored trigger stamped as its scanner would


def test_explain_draws_the_same_pictures_from_the_same_module(scanned_tiny, tmp_path):
    """`xray explain` and the report share xray.explain: planes re-run with the run's config,
    the stored triggers re-applied, drawn through xray.plots."""
    from xray.explain import explain_model, explain_triggers

    copy, summary, model_id, config = _copy_with_trojaned_model(scanned_tiny, tmp_path)
    assert explain_triggers(str(copy), model_id) is None  # Model X-ray stores no triggers
    png = explain_model(str(copy), model_id, png_uri=str(tmp_path / "planes.png"), max_planes=2)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = load_scores(str(copy)).query("model_id == @model_id").iloc[0]
    h = w = config["input_shape"][1]
    mask = np.zeros((1, h, w), np.float32)
    mask[0, :3, :3] = 1.0
    write_part(str(copy), "triggers", summary.run_id, [_trigger_row(
        summary.run_id, model_id, row, 0, 0, 0.5, mask, np.ones((3, h, w), np.float32))])
    png = explain_triggers(str(copy), model_id)
    assert png == str(copy / "explain" / f"{model_id}-triggers.png")
    data = Path(png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert explain_triggers(str(copy), "no-such-model") is None


def _fake_planes(n: int, classes: int = 10) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"pred": rng.integers(0, classes, (8, 8)), "c1": np.linspace(-1, 1, 8),
             "c2": np.linspace(-1, 1, 8), "sample_coords": [(0, 0), (0.5, 0), (0, 0.5)],
             "sample_labels": [0, 1, 4], "dominating_label": 3, "dominating_share": 0.4,
             "re": 1.5, "ats": 0.5} for _ in range(n)]


def _texts(fig) -> tuple[str, list[str], list[str]]:
    """(suptitle, every axes title, every figure-legend text) of a matplotlib Figure."""
    titles = [ax.get_title() for ax in fig.get_axes()]
    legend = sorted((t.get_text() for lg in fig.legends for t in lg.get_texts()),
                    key=lambda text: int(text.split()[0]))  # by class, not legend order
    return fig.get_suptitle(), titles, legend


def test_planes_figure_names_model_verdict_targets_and_class_colours():
    from xray.plots import Finding, Headline, planes_figure

    headline = Headline("id-00000008", "trojaned", 2, (
        Finding("modelxray", "trojaned", -1.724, -1.737, 3),
        Finding("mmbd", "clean", 0.5, 0.8, 2)))
    fig = planes_figure(_fake_planes(3), 10, headline, total=8,
                        triggers=[[("true trigger applied (target 2)", np.ones((8, 8, 3)), None)]])
    title, axes_titles, legend = _texts(fig)
    assert title.splitlines() == [
        "id-00000008 (ground truth trojaned, true target 2)",
        "modelxray: TROJANED, score -1.724 >= threshold -1.737, predicted target 3 vs true 2",
        "mmbd: clean, score 0.5 < threshold 0.8, predicted target 2 vs true 2"]
    # planes numbered from 1 out of the scan's count, as the report's captions count them
    assert [t.split(":")[0] for t in axes_titles if t.startswith("plane")] == [
        "plane 1 of 8", "plane 2 of 8", "plane 3 of 8"]
    assert "true trigger applied (target 2)" in axes_titles  # the trigger beside the planes
    # one legend entry per class; the predicted target highlighted, the true target named
    assert legend == ["0", "1", "2 = true target", "3 = predicted target"] + [
        str(k) for k in range(4, 10)]
    (class_legend,) = fig.legends
    bold = [t.get_text() for t in class_legend.get_texts() if t.get_fontweight() == "bold"]
    assert bold == ["3 = predicted target"]
    framed = [(t.get_text(), h.get_linewidth())
              for t, h in zip(class_legend.get_texts(), class_legend.legend_handles)]
    assert [text for text, width in framed if width > 0] == ["3 = predicted target"]
    # a clean model without ground truth: no target claimed
    plain = planes_figure(_fake_planes(1), 10, Headline("m", "unknown", None, (
        Finding("modelxray", "no threshold", 0.1, None, None),)))
    title, _, legend = _texts(plain)
    assert title == "m (ground truth unknown)\nmodelxray: no threshold, score 0.1, no " \
        "threshold, no predicted target"
    assert legend == [str(k) for k in range(10)]


def test_explain_pictures_are_titled_with_verdict_and_targets(scanned_tiny, tmp_path,
                                                                monkeypatch):
    """`xray explain`'s planes PNG: titled with the model id, each detector's verdict and score
    against its threshold, predicted vs true target; the class legend; the true trigger beside
    the planes. The same headline over the triggers PNG."""
    import xray.explain as explain

    copy, summary, model_id, config = _copy_with_trojaned_model(scanned_tiny, tmp_path)
    figures = []
    real_png_bytes = explain.png_bytes

    def keep(fig, dpi=100):
        figures.append(fig)
        return real_png_bytes(fig, dpi)

    monkeypatch.setattr(explain, "png_bytes", keep)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    explain.explain_model(str(copy), model_id, png_uri=str(OUTPUT / "explain.png"),
                          max_planes=2)
    title, axes_titles, legend = _texts(figures[-1])
    scores = load_scores(str(copy)).query("model_id == @model_id").iloc[0]
    head, modelxray = title.splitlines()[:2]
    assert head == f"{model_id} (ground truth trojaned, true target {config['target']})"
    assert modelxray.startswith("modelxray: ") and " threshold " in modelxray
    assert f"score {scores['score']:.4g} " in modelxray
    assert modelxray.endswith(f"predicted target {int(scores['predicted_target'])} vs true "
                              f"{config['target']}")
    assert ("TROJANED" in modelxray) == (" >= threshold " in modelxray)
    scanned = len(json.loads(scores["stats_json"])["re_per_plane"])  # the scan's planes
    assert [t.split(":")[0] for t in axes_titles if t.startswith("plane")] == [
        f"plane 1 of {scanned}", f"plane 2 of {scanned}"]
    assert f"true trigger applied (target {config['target']})" in axes_titles
    predicted = int(scores["predicted_target"])
    assert len(legend) == config["num_classes"]
    assert legend[predicted].startswith(f"{predicted} = predicted target")
    assert "true target" in legend[config["target"]]

    # the triggers picture carries the same headline
    h = w = config["input_shape"][1]
    mask = np.zeros((1, h, w), np.float32)
    mask[0, :3, :3] = 1.0
    write_part(str(copy), "triggers", summary.run_id, [_trigger_row(
        summary.run_id, model_id, scores, 0, 0, 0.5, mask, np.ones((3, h, w), np.float32))])
    explain.explain_triggers(str(copy), model_id)
    title, axes_titles, _ = _texts(figures[-1])
    assert title.splitlines()[0] == head and "modelxray inverted #0 -> 0: mask" in axes_titles
    # and explain's planes now show the inverted trigger beside the true one
    explain.explain_model(str(copy), model_id, png_uri=str(tmp_path / "p.png"), max_planes=1)
    _, axes_titles, _ = _texts(figures[-1])
    assert "modelxray inverted #0 -> 0: mask" in axes_titles


# ---------------------------------------------------------------------------------------------
# No ground truth; a large run


T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _rows(n: int, detectors: dict[str, float], truth: bool, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        poisoned = bool(i % 3 == 0)
        for name, separation in detectors.items():
            ok = i % 97 != 5
            rows.append({
                "run_id": "R", "model_id": f"m{i:05d}", "model_digest": "d", "detector": name,
                "detector_version": "1", "config_hash": f"h-{name}",
                "status": "ok" if ok else "timeout", "error": None if ok else "TimeoutError: x",
                "score": float(rng.normal(separation * poisoned, 1.0)) if ok else None,
                "predicted_target": 0, "stats_json": "{}", "seconds": float(rng.gamma(2.0, 1.0)),
                "worker": "w", "architecture": "net", "num_classes": 10,
                "gt_poisoned": poisoned if truth else None, "gt_target": None,
                "gt_attack": "badnets" if truth and poisoned else None,
                "tags_json": "{}", "finished_at": T0 + timedelta(seconds=i)})
    return rows


def _write(out: Path, rows: list[dict]) -> None:
    (out / "scores" / "run=R").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCORES),
                   out / "scores" / "run=R" / "part-0.parquet")


def test_report_without_ground_truth_has_scores_and_verdicts_only(tmp_path):
    _write(tmp_path, _rows(60, {"det_a": 2.0, "det_b": 0.5}, truth=False))
    html = Path(render_report(str(tmp_path))).read_text()
    assert 'id="roc-plot"' not in html
    assert "No ROC curve" in html and "no ground truth" in html
    assert html.count('class="hist"') == 2 and 'class="runtime"' in html
    # no ground truth and no given threshold: no verdicts, and the page says how to get them
    assert "<section" not in html and "no threshold (det_a, det_b)" in html
    html = Path(render_report(str(tmp_path), thresholds={"det_a": 1.0, "det_b": 1.0})).read_text()
    assert "(unknown)" in html and "flagged by det_a" in html  # drill-down of flagged models
    assert "(wrong)" not in html and "(right)" not in html  # no verdict judged without truth
    assert "timeout" in html and "TimeoutError: x" in html  # coverage and errors


def test_report_of_a_large_run_caps_the_drilldown(tmp_path):
    _write(tmp_path, _rows(3000, {"det_a": 1.0}, truth=True))
    html = Path(render_report(str(tmp_path), max_drilldown=7)).read_text()
    assert html.count('<section class="drill') == 7
    left = re.search(r"at most 7; (\d+) more not shown", html)
    assert left and int(left.group(1)) > 100
    sections = re.findall(r'<section class="drill [a-z]+" id="model-(m\d+)"', html)
    assert all("false" in html[html.index(f'id="model-{m}"'):][:2000] for m in sections)
