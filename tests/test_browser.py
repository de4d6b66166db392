"""The page in a real browser: Debian's chromium, headless, driven by playwright (slow; CI runs it).

Screenshots go to ``artifacts/`` at the repository root (kept by CI, ignored by git).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
DOCS = Path(__file__).resolve().parents[1] / "docs"  # the README's screenshots, retaken by these tests
LAPTOP, PHONE = {"width": 1440, "height": 900}, {"width": 390, "height": 844}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture
def page(served_app):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1600, "height": 1400}, accept_downloads=True)
        page = context.new_page()
        page.goto(served_app)
        page.get_by_role("button", name="Run", exact=True).wait_for()
        yield page
        browser.close()


def status_text(page) -> str:
    return page.get_by_text(re.compile(r"^Step \d+/\d+")).first.inner_text()


def download_results(page, tmp_path: Path) -> dict:
    with page.expect_download() as download:
        page.locator('a[download="results.json"]').first.click()
    target = tmp_path / "results.json"
    download.value.save_as(target)
    return json.loads(target.read_text())


def test_default_run_renders_every_live_plot_and_downloads(page, tmp_path):
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Done in").wait_for(timeout=120_000)
    plots = page.locator(".js-plotly-plot")
    assert plots.count() == 6  # matrix, ACC/BWT, curves; the live cosines, spectra and OPCM's removed share
    heatmap, lines, curves = (plots.nth(i) for i in range(3))
    assert heatmap.locator(".hm, .heatmaplayer image").count() >= 1
    assert heatmap.locator(".textpoint, text").filter(has_text=re.compile(r"^\d+\.\d$")).count() >= 36  # 8·9/2 cells
    assert lines.locator(".scatterlayer .trace").count() >= 3  # opcm and the two reference lines (+ BWT)
    assert curves.locator(".scatterlayer .trace").count() == 8  # one per task
    assert page.get_by_role("cell", name="opcm").count() >= 1
    cosine = page.locator("#lab-plot-cosine .js-plotly-plot")
    assert cosine.evaluate("el => el.data[0].z.length") == 9  # eight task vectors and OPCM's merged delta
    spectra = page.locator("#lab-plot-spectra .js-plotly-plot")
    assert spectra.evaluate("el => el.layout.title.text").startswith("Spectra of block 1 · mlp.c_fc after step 8")
    assert page.locator("#lab-plot-removed .js-plotly-plot").count() == 1
    page.screenshot(path=str(ARTIFACTS / "lab-default-run.png"), full_page=True)
    # after the run, another layer from the list shows at once, for the final state
    page.locator("#lab-layer input").click()
    page.get_by_role("option", name="block 0 · attn.q", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('#lab-plot-spectra .js-plotly-plot')?.layout.title.text"
        ".startsWith('Spectra of block 0 · attn.q')",
        timeout=60_000,
    )
    results = download_results(page, tmp_path)
    assert results["completed_steps"] == 8 and results["tasks"][0] == "mini-land-cover"
    assert 0.5 < results["methods"]["opcm"]["acc"] < 1.0


def test_stop_keeps_the_steps_already_shown_and_says_stopped(page, tmp_path):
    page.get_by_label("otmf").check()  # OPCM and OTMF side by side: a longer run
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text(re.compile(r"^Step 2/8")).wait_for(timeout=120_000)
    page.get_by_role("button", name="Stop", exact=True).click()
    acknowledged = page.get_by_text(re.compile(r"^Stopped after step \d+ of 8")).first
    acknowledged.wait_for(timeout=30_000)
    stopped = acknowledged.inner_text()
    page.wait_for_timeout(6000)  # a running OTMF would have finished more steps by now
    assert acknowledged.inner_text() == stopped and "stay in the downloads" in stopped
    completed = int(re.search(r"step (\d+) of 8", stopped).group(1))
    assert 2 <= completed < 8
    assert page.locator(".js-plotly-plot").count() == 6
    page.screenshot(path=str(ARTIFACTS / "lab-stopped.png"), full_page=True)
    results = download_results(page, tmp_path)
    assert results["completed_steps"] == completed and set(results["methods"]) == {"opcm", "otmf"}


def test_a_layer_chosen_mid_run_shows_from_the_next_step(page):
    page.get_by_label("otmf").check()  # a slower run, so there is time to choose between steps
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text(re.compile(r"^Step 2/8")).wait_for(timeout=120_000)
    page.locator("#lab-layer input").click()
    page.get_by_role("option", name="block 1 · attn.v", exact=True).click()
    title = "() => document.querySelector('#lab-plot-spectra .js-plotly-plot')?.layout.title.text || ''"
    page.wait_for_function(f"({title})().startsWith('Spectra of block 1 · attn.v after step')", timeout=120_000)
    shown = page.evaluate(f"({title})()")
    step = int(re.search(r"after step (\d+)", shown).group(1))
    # a later step than the one on the page when the layer was chosen, while the run still streams
    # (a choice queued behind the run would show only after step 8, as the final state)
    assert 3 <= step < 8 and page.get_by_text("Done in").count() == 0
    page.get_by_role("button", name="Stop", exact=True).click()


def test_a_zoom_survives_the_live_updates(page):
    page.get_by_label("otmf").check()  # a slower run, so updates keep coming while we zoom
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text(re.compile(r"^Step 2/8")).wait_for(timeout=120_000)
    curves = page.locator("#lab-plot-per-task .js-plotly-plot")
    area = curves.locator(".nsewdrag").first.bounding_box()
    page.mouse.move(area["x"] + area["width"] * 0.1, area["y"] + area["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(area["x"] + area["width"] * 0.4, area["y"] + area["height"] * 0.5, steps=10)
    page.mouse.up()
    page.wait_for_timeout(300)
    zoomed = curves.evaluate("el => el.layout.xaxis.range")
    page.get_by_text(re.compile(r"^Step 4/8")).wait_for(timeout=120_000)
    page.wait_for_timeout(500)
    after = page.locator("#lab-plot-per-task .js-plotly-plot").evaluate("el => el.layout.xaxis.range")
    assert after == pytest.approx(zoomed, abs=1e-6)
    page.get_by_role("button", name="Stop", exact=True).click()


def test_an_error_names_the_culprit_and_keeps_earlier_results(page):
    box = page.get_by_label(re.compile("Checkpoints in merge order"))
    box.fill("\n".join(box.input_value().splitlines()[:2]))
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Done in").wait_for(timeout=120_000)
    box.fill("/nowhere/model")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text(re.compile(r"Error: cannot tell which task checkpoint /nowhere/model")).first.wait_for(
        timeout=30_000
    )
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "lab-error.png"), full_page=True)
    curves = page.locator(".js-plotly-plot").nth(2)
    assert curves.locator(".scatterlayer .trace").count() == 2  # the earlier run's two tasks are still drawn
    # the toast's title, and no output carries an error mark (Gradio may also announce the toast in
    # a screen-reader-only live region, which is not shown)
    marks = page.get_by_text("Error", exact=True).evaluate_all(
        "els => els.filter(e => !e.closest('.sr-only')).map(e => e.outerHTML.slice(0, 200))"
    )
    assert len(marks) == 1 and "toast-title" in marks[0], marks
    assert page.get_by_role("button", name="Run", exact=True).is_enabled()


@pytest.fixture
def hosted_page(served_hosted_app):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1600, "height": 1400}, accept_downloads=True).new_page()
        page.goto(served_hosted_app)
        page.get_by_role("button", name="Run", exact=True).wait_for()
        yield page
        browser.close()


def test_the_merge_page_offers_a_download_and_no_server_path_when_hosted(hosted_page, tmp_path):
    from merging.io.checkpoints import load_encoder

    page = hosted_page
    page.get_by_role("tab", name="Merge and download").click()
    labels = page.locator("label").all_inner_texts()
    assert not any(re.search(r"write|output|save to", text, re.IGNORECASE) for text in labels), labels
    page.get_by_label(re.compile("Pretrained encoder")).fill("assets/mini/base")
    page.get_by_label(re.compile("Fine-tuned checkpoints, one per line")).fill(
        "assets/mini/checkpoints/mini-letters\nassets/mini/checkpoints/mini-digits"
    )
    page.get_by_role("button", name="Merge", exact=True).click()
    link = page.locator('a[download="model.safetensors"]').first
    link.wait_for(timeout=60_000)
    with page.expect_download() as download:
        link.click()
    target = tmp_path / "merged" / "model.safetensors"
    target.parent.mkdir()
    download.value.save_as(target)
    assert {"conv1.weight", "ln_post.weight"} <= set(load_encoder(target))
    page.screenshot(path=str(ARTIFACTS / "merge-download.png"), full_page=True)
    page.get_by_label(re.compile("Pretrained encoder")).fill("/etc")
    page.get_by_role("button", name="Merge", exact=True).click()
    page.get_by_text(re.compile("server paths cannot be read on this hosted lab: '/etc'")).first.wait_for(
        timeout=30_000
    )


# Per plot of the page: whether its legend's box overlaps any of its x-axis titles, whether its title
# lies inside the plot, and its traces' line colours.
MEASURE_PLOTS = """
() => {
  const box = (el) => el.getBoundingClientRect();
  const overlap = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  return [...document.querySelectorAll('[id^="lab-plot-"] .js-plotly-plot')].map((plot) => {
    const legend = plot.querySelector('.legend .bg');
    const titles = [...plot.querySelectorAll('[class*="xtitle"]')];
    const title = plot.querySelector('.gtitle');
    const outer = box(plot);
    return {
      id: plot.closest('[id^="lab-plot-"]').id,
      xtitles: titles.length,
      overlapping: legend ? titles.filter((t) => overlap(box(legend), box(t))).map((t) => t.textContent) : [],
      title_inside: !title || (box(title).left >= outer.left - 1 && box(title).right <= outer.right + 1),
      colours: (plot.data || []).filter((t) => t.showlegend !== false && t.line).map((t) => t.line.color),
    };
  });
}
"""


def in_view(page, locator) -> bool:
    """Whether the element's whole box lies inside the window (seen without scrolling)."""
    box = locator.bounding_box()
    size = page.viewport_size
    return (
        box is not None
        and box["x"] >= 0
        and box["y"] >= 0
        and (box["x"] + box["width"] <= size["width"] and box["y"] + box["height"] <= size["height"])
    )


def assert_actions_in_view(page, where: str) -> None:
    for name in ("Run", "Stop"):
        assert in_view(page, page.get_by_role("button", name=name, exact=True)), f"{name} out of view {where}"
    assert in_view(page, page.locator("#lab-status")), f"the status is out of view {where}"


def scroll_to_bottom(page) -> None:
    page.evaluate("window.scrollTo(0, document.documentElement.scrollHeight)")
    page.wait_for_timeout(300)
    assert page.evaluate("window.scrollY") > 500  # the page is long: this really scrolled


def test_run_and_stop_stay_in_reach_on_a_laptop_and_a_phone_and_the_plots_read_at_a_glance(served_app, tmp_path):
    """At 1440 × 900 and at a 390 px phone width, Run, Stop and the status are in the window before
    a run, at the bottom of the page while it streams and after it; after the default run (on the phone
    started by the classroom's "What the projection removes") no legend covers an x-axis title, every
    title fits its plot, the eight tasks have eight colours and the step account tells the last step.
    The README's two screenshots (docs/lab-laptop.png, docs/lab-phone.png) are taken here."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        for name, viewport in (("laptop", LAPTOP), ("phone", PHONE)):
            page = browser.new_context(viewport=viewport, accept_downloads=True).new_page()
            page.goto(served_app)
            page.get_by_role("button", name="Run", exact=True).wait_for()
            assert_actions_in_view(page, f"on opening ({name})")
            if name == "laptop":  # by keyboard alone: Tab reaches Run (early: the bar is at the top), Enter runs
                for _ in range(40):
                    page.keyboard.press("Tab")
                    if page.evaluate("document.activeElement?.id") == "lab-run":
                        break
                assert page.evaluate("document.activeElement?.id") == "lab-run"
                page.keyboard.press("Enter")
            else:  # the classroom: one click sets the lab up for a question and runs it (here OPCM on mini-8)
                page.get_by_text("Classroom: prepared experiments").click()
                page.get_by_role("button", name="What the projection removes", exact=True).click()
                page.get_by_text("OPCM removes, from each new task vector").wait_for(timeout=30_000)
            # any step from the second on: a busy browser may render two quick updates as one, so no
            # single step's text is sure to be seen (the served app's cache starts empty: the reference
            # rows come first, slow on a loaded machine)
            page.get_by_text(re.compile(r"^Step [2-8]/8")).first.wait_for(timeout=300_000)
            scroll_to_bottom(page)  # while the results stream
            assert_actions_in_view(page, f"at the bottom while the run streams ({name})")
            page.get_by_text("Done in").wait_for(timeout=300_000)
            page.wait_for_timeout(500)
            measured = page.evaluate(MEASURE_PLOTS)
            assert len(measured) == 6, measured
            for plot in measured:
                assert plot["overlapping"] == [], f"{name}: {plot['id']}'s legend covers {plot['overlapping']}"
                assert plot["title_inside"], f"{name}: {plot['id']}'s title is cut"
            assert all(p["xtitles"] >= 1 for p in measured)  # the check above had titles to look at
            account = page.locator("#lab-account").inner_text()
            assert account.startswith("Step 8: mini-colors entered.") and "projected away" in account
            curves = next(p for p in measured if p["id"] == "lab-plot-per-task")["colours"]
            assert len(curves) == 8 == len(set(curves))
            if name == "laptop":  # the run joined the session's history, and the compare view shows it
                page.get_by_text("Runs of this session").click()
                runs = page.locator("#lab-plot-runs .js-plotly-plot")
                runs.wait_for(timeout=30_000)
                assert runs.evaluate("el => el.data.filter((t) => t.showlegend !== false).map((t) => t.name)") == [
                    "#1 opcm"
                ]
                page.get_by_role("button", name="Download every run (zip)").click()
                link = page.locator('a[download="runs.zip"]').first
                link.wait_for(timeout=30_000)
                with page.expect_download() as download:
                    link.click()
                target = tmp_path / "runs.zip"
                download.value.save_as(target)
                with zipfile.ZipFile(target) as archive:
                    assert json.loads(archive.read("run-01/results.json"))["completed_steps"] == 8
                page.get_by_text("Compare methods").click()
                compare = page.locator("#lab-plot-compare .js-plotly-plot")
                compare.wait_for(timeout=30_000)
                assert compare.evaluate("el => el.data[0].z.length") == 8
            scroll_to_bottom(page)
            assert_actions_in_view(page, f"at the bottom after the run ({name})")
            if name == "laptop":
                page.evaluate("window.scrollTo(0, 0)")
            else:  # the phone's picture: the action bar over the accuracy matrix
                page.evaluate("window.scrollTo(0, document.querySelector('#lab-plot-matrix').offsetTop)")
                page.locator("#lab-plot-matrix").scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            page.screenshot(path=str(DOCS / f"lab-{name}.png"))
            page.context.close()
        browser.close()
