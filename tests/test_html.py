"""The web page of the worklist, opened in a real headless browser (Chromium through Playwright).

Skipped with a reason where no browser is installed; `.ci/run` installs Debian's chromium and the
dev extras bring Playwright. Screenshots are kept in $RADSCAN_TEST_ARTIFACTS (default
build/test-artifacts) for a person to look at.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest
from click.testing import CliRunner

from radscan.cli import cli
from radscan.htmlreport import PAGE_SIZE, write_worklist_html

from .conftest import CXR_DIR, DICOM_DIR

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e .[dev]")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (CI installs it)")
ARTIFACTS = Path(os.environ.get("RADSCAN_TEST_ARTIFACTS", Path(__file__).parents[1] / "build" / "test-artifacts"))
# no network on these machines: Chromium's background connections would only fail
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
HOSTILE = '<img src=x onerror="document.title=\'pwned\'">.jpeg'


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def _open(browser, page_path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    page.goto(page_path.as_uri())
    page.wait_for_selector("#rows tr")
    return page, problems


def _until(page, expression: str, arg=None, timeout: float = 20) -> None:
    """Wait until `expression` is truthy in the page. Not page.wait_for_function: its polling
    evaluates the expression with eval(), which the page's Content Security Policy forbids, so it
    fails whenever the condition is not true at once (a slower machine)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression, arg):
        assert time.monotonic() < deadline, f"not true after {timeout} s: {expression}"
        time.sleep(0.05)


def _studies_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_worklist_page_matches_the_csv_filters_work_and_values_stay_text(studies, tiny_model, tmp_path,  # noqa: F811
                                                                          browser):
    source = next((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())
    (studies / "evil").mkdir()
    shutil.copy(source, studies / "evil" / HOSTILE)
    (studies / "broken").mkdir()
    (studies / "broken" / "half.jpeg").write_bytes(source.read_bytes()[:400])
    (studies / "normal0" / "half.jpeg").write_bytes(source.read_bytes()[:400])  # a study read in part
    (studies / "ct").mkdir()
    shutil.copy(DICOM_DIR / "pydicom/CT_small.dcm", studies / "ct" / "slice.dcm")  # skipped by policy
    out = tmp_path / "out" / "report.csv"
    result = CliRunner().invoke(cli, ["score", str(studies), "--out", str(out), "--model", str(tiny_model),
                                      "--workers", "1"])
    assert result.exit_code == 3, result.output  # the broken file: finished, some files not used
    every = _studies_csv(out.with_name("report_studies.csv"))
    rows = [row for row in every if row["study_section"] == "reading"]
    page, problems = _open(browser, out.with_name("report.html"))
    assert page.locator("#rows tr").count() == len(rows)
    assert [int(r) for r in page.locator("#rows tr").evaluate_all("rows => rows.map(r => r.dataset.rank)")] == \
        [int(row["study_rank"]) for row in rows]
    # issue 21 item 2: a file nothing could be read of is for IT, listed apart, after the reading list
    unreadable = [row for row in every if row["study_section"] == "unreadable"]
    assert [row["top_path"] for row in unreadable] == ["broken/half.jpeg"]
    assert page.locator("#it-rows tr").count() == 1 and "could not be read" in page.locator("#it").inner_text()
    assert int(unreadable[0]["study_rank"]) > max(int(row["study_rank"]) for row in rows if row["study_score"])
    # and one the selection policy skipped has its own section too, not a place in the reading list
    assert [row["top_path"] for row in every if row["study_section"] == "skipped"] == ["ct/slice.dcm"]
    assert "ct/slice.dcm" in page.locator("#skipped").inner_text() and page.locator("#skipped").is_visible()
    assert "ct/slice.dcm" not in page.locator("#rows").inner_text()
    assert page.get_by_text(HOSTILE).count() == 1 and page.title().startswith("radscan worklist")  # text, not markup
    # issue 21 item 3: each score with its z, the bar centred on the threshold, wider for a higher z
    labels = page.locator("#rows .bar + div").all_inner_texts()
    assert labels and all(" z\xa0" in label for label in labels)  # no-break: "z" stays with its number
    labels = [label.replace("\xa0", " ") for label in labels]
    widths = page.locator("#rows .bar .fill").evaluate_all("fills => fills.map(f => parseFloat(f.style.width))")
    assert widths == sorted(widths, reverse=True)  # the studies come in score order
    zs = [float(label.split(" z ")[1].split()[0]) for label in labels]
    # the bar keeps the order of the list's top: only the farthest study fills it, distinct z, distinct bars
    assert max(widths) <= 100 and sum(width == 100 for width in widths) <= 1
    pairs = zip(widths, widths[1:], zs, zs[1:], strict=False)
    assert all(a > b for a, b, za, zb in pairs if za > zb + 0.05), (widths, zs)
    assert page.locator("#rows .bar .threshold").first.evaluate("m => m.style.left") == "50%"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "worklist.png", full_page=True)

    page.get_by_role("button", name="Flagged").click()
    assert page.locator("#rows tr").count() == sum(row["study_flag"] == "true" for row in rows)
    page.get_by_role("button", name="Not judged / errors").click()
    attention = [row for row in rows if row["images_error"] != "0" or row["images_rejected"] != "0"
                 or not row["study_score"]]
    assert page.locator("#rows tr").count() == len(attention) >= 1
    assert "could not be read" in page.locator("#rows").inner_text()  # normal0's broken file, beside its film
    page.get_by_role("button", name="All").click()
    page.get_by_placeholder("Filter by ID").fill("pneumonia")
    assert page.locator("#rows tr").count() == sum("pneumonia" in row["top_path"] for row in rows)
    page.get_by_placeholder("Filter by ID").fill("")
    page.locator("#rows img").first.click()
    assert page.locator("#viewer").is_visible()
    _until(page, "document.getElementById('viewer-image').naturalWidth > 0")  # the PNG loads
    page.keyboard.press("Escape")
    assert not page.locator("#viewer").is_visible()
    assert not problems, problems


def test_ten_thousand_studies_are_drawn_a_page_at_a_time(tmp_path, browser):
    entries = [{"rank": i + 1, "score": 1 - i / 10_000, "flag": i < 500, "new": i % 3 == 0, "images": 1,
                "scored": 1, "errors": 0, "rejected": 0, "note": "", "patient": f"P{i:05d}", "accession": "",
                "uid": f"1.2.{i}", "date": "2026-11-29", "modality": "DX", "path": f"study{i}/im.dcm", "picture": ""}
               for i in range(10_000)]
    summary = {"disclaimer": "research only", "model_name": "m", "model_version": "1", "model_sha256": "0" * 64,
               "score_kind": "critic", "threshold": 0.95, "run_id": "r", "finished_at": "now",
               "radscan_version": "x", "report_name": "report.csv", "studies_name": "report_studies.csv",
               "studies": 10_000, "flagged_studies": 500, "counts": {"ok": 10_000},
               "run_status": {"last_attempt": {"at": "2026-12-03T02:00:00+00:00", "ok": True, "problems": []},
                              "last_success": {"at": "2026-12-03T02:00:00+00:00"}}}
    write_worklist_html(tmp_path / "report.html", entries, summary)
    page, problems = _open(browser, tmp_path / "report.html")
    assert page.locator("#rows tr").count() == PAGE_SIZE
    page.get_by_role("button", name="Next").click()
    assert page.locator("#rows tr").first.get_attribute("data-rank") == str(PAGE_SIZE + 1)
    page.get_by_role("button", name="Flagged").click()
    assert page.locator("#shown").inner_text().startswith("500 of 10000")
    page.get_by_placeholder("Filter by ID").fill("P09999")
    assert page.locator("#rows tr").count() == 0  # P09999 is not flagged
    page.get_by_role("button", name="All").click()
    assert page.locator("#rows tr").count() == 1
    assert not problems, problems


def test_a_score_just_under_the_threshold_never_reads_as_the_threshold(tmp_path, browser):
    """A new user's trial: a film scored 0.879631, not flagged, read "0.880 · z 2.0" under a header
    that said "threshold 0.880". Each score and z shows the decimals it needs to read on its side. A
    second trial: the page read 1.000 where the film's picture read 0.999: both cut the score alike."""
    import math

    from radscan.batch import score_text

    threshold = 0.879705
    scores = [(0.879631, False), (threshold, True), (0.8801, True), (0.5, False), (0.999999, True), (0.29, False),
              (0.9999, True), (0.88, True), (1.0, True)]  # 1.0: stored so from z 14.5 up (a review's trial)
    entries = [{"rank": i + 1, "score": score, "z": round(math.log(score / (1 - score)), 3) if score < 1 else 15.2,
                "flag": flag,
                "new": False, "images": 1, "scored": 1, "errors": 0, "rejected": 0, "note": "", "patient": f"P{i}",
                "accession": "", "uid": f"1.2.{i}", "date": "2026-11-29", "modality": "DX", "path": f"s{i}/im.dcm",
                "picture": ""} for i, (score, flag) in enumerate(scores)]
    summary = {"disclaimer": "research only", "model_name": "m", "model_version": "1", "model_sha256": "0" * 64,
               "score_kind": "density", "threshold": threshold, "run_id": "r", "finished_at": "now",
               "radscan_version": "x", "report_name": "report.csv", "studies_name": "report_studies.csv",
               "studies": len(entries), "flagged_studies": sum(flag for _, flag in scores),
               "counts": {"ok": len(entries)},
               "run_status": {"last_attempt": {"at": "2026-12-03T02:00:00+00:00", "ok": True, "problems": []},
                              "last_success": {"at": "2026-12-03T02:00:00+00:00"}}}
    write_worklist_html(tmp_path / "report.html", entries, summary)
    page, problems = _open(browser, tmp_path / "report.html")
    shown = {}
    for rank in range(1, len(entries) + 1):
        text = page.locator(f"#rows tr[data-rank='{rank}']").inner_text()
        shown[rank] = re.search(r"(>?\d\.\d+) · z\s(-?\d+\.\d+)", text).groups()
    assert shown[1] == ("0.879", "1.989")  # threshold 0.8797 (z 1.990): cut, it reads under 0.880
    assert shown[2] == ("0.8797", "2.0") and shown[3] == ("0.880", "2.0") and shown[4] == ("0.500", "0.0")
    assert shown[5][0] == "0.999" and shown[6][0] == "0.290"  # cut, not rounded to 1.000; 0.29 not cut to 0.289
    assert shown[9][0] == ">0.999"
    for (score, flag), (text, _) in zip(scores, shown.values(), strict=True):
        assert text.startswith(">") or (float(text) >= float(f"{threshold:.{len(text) - 2}f}")) == flag
        assert text == score_text(score, threshold)  # the film's picture says what its row says (a trial)
    assert not problems, problems


def test_a_failed_night_leaves_a_page_that_says_its_list_is_stale(studies, tiny_model, tmp_path,  # noqa: F811
                                                                     browser):
    """Issue 21 item 6: after a failed night (exit 66) report.html was byte-identical to the night
    before, with no banner. The failed run rewrites only the page's run record: the list stays, and
    the page says, in local time, that it is older than the last attempt and why; the next good run
    clears it."""
    out = tmp_path / "out" / "report.csv"
    args = ["score", str(studies), "--out", str(out), "--model", str(tiny_model), "--workers", "1", "--no-residuals"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    page, problems = _open(browser, out.with_name("report.html"))
    assert not page.locator("#stale").is_visible() and "Last attempt" in page.locator("#runs").inner_text()
    before = page.locator("#rows").inner_text()
    page.close()

    studies.rename(studies.with_name("unmounted"))  # the share is gone tonight
    failed = CliRunner().invoke(cli, args)
    assert failed.exit_code == 66
    page, problems = _open(browser, out.with_name("report.html"))
    banner = page.locator("#stale")
    assert banner.is_visible() and "out of date" in banner.inner_text() and "exit 66" in banner.inner_text()
    assert "no files found" in banner.inner_text() or "does not exist" in banner.inner_text(), banner.inner_text()
    assert "FAILED" in page.locator("#runs").inner_text()
    assert page.locator("#rows").inner_text() == before  # the list is still there to read
    page.screenshot(path=ARTIFACTS / "worklist-stale.png", full_page=True)
    page.close()

    studies.with_name("unmounted").rename(studies)
    assert CliRunner().invoke(cli, args).exit_code == 0
    page, more = _open(browser, out.with_name("report.html"))
    assert not page.locator("#stale").is_visible()
    assert not problems and not more, problems + more


def test_every_picture_opens_from_the_page_whatever_a_study_is(tiny_model, tmp_path, browser):
    """Issue 21 item 1: a flat folder of films is a study per film (auto), a folder of a few views one
    study whose every image opens from its row; --study-key folder regroups the stored rows on a rerun."""
    films = sorted((CXR_DIR / "kermany_pediatric_224/test_abnormal").iterdir())[:15]
    flat, views = tmp_path / "export", tmp_path / "export" / "patient1"
    views.mkdir(parents=True)
    for film in films[:12]:
        shutil.copy(film, flat / film.name)
    for film in films[12:]:
        shutil.copy(film, views / film.name)
    out = tmp_path / "out" / "report.csv"
    pictures = out.parent / "report_residuals"

    def run(mode: str) -> dict:
        result = CliRunner().invoke(cli, ["score", str(flat), "--out", str(out), "--model", str(tiny_model),
                                          "--workers", "1", "--pictures", "all", "--study-key", mode, "--json"])
        assert result.exit_code == 0, result.output
        warnings.append(result.stderr)
        return json.loads(result.stdout)

    warnings: list[str] = []

    def linked(page) -> set[str]:
        page.locator("#rows details").evaluate_all("all => all.forEach(details => { details.open = true; })")
        hrefs = page.locator("#rows img").evaluate_all("images => images.map(i => i.getAttribute('src'))")
        hrefs += page.locator("#rows ol.members a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        return {Path(href).name for href in hrefs}

    assert run("auto")["studies"] == 13
    page, problems = _open(browser, out.with_name("report.html"))
    assert page.locator("#rows tr").count() == 13 and page.locator("#rows details").count() == 1
    page.locator("#rows details summary").click()  # "3 scored of 3" opens the study's list
    assert page.locator("#rows ol.members a").nth(0).is_visible()
    assert linked(page) == {png.name for png in pictures.glob("*.png")} and len(linked(page)) == 15
    members = page.locator("#rows ol.members a")
    assert members.count() == 3
    members.nth(2).click()
    assert page.locator("#viewer").is_visible()
    _until(page, "document.getElementById('viewer-image').naturalWidth > 0")
    assert page.locator("#viewer-caption").inner_text().startswith("patient1/")
    page.keyboard.press("Escape")
    for name in [members.nth(index).inner_text() for index in range(3)]:  # any image finds its study
        page.locator("#search").fill(name)
        assert page.locator("#rows tr").count() == 1 and "patient1" in page.locator("#rows").inner_text(), name
    assert not problems, problems
    # on a phone the image column gives way: the study's images are listed under its identity
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(out.with_name("report.html").as_uri())
    phone.wait_for_selector("#rows tr")
    phone.locator("#rows details summary").click()
    links = phone.locator("#rows ol.members a")
    assert links.count() == 3 and all(links.nth(index).is_visible() for index in range(3))
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1

    summary = run("folder")  # the 12 films whose study the crawl named anew are read again; patient1's kept
    assert summary["studies"] == 2 and summary["scored_now"] == 12
    assert "12 films without a study UID are grouped into studies differently" in warnings[-1]  # said, not silent
    assert any("--study-key changed" in problem for problem in summary["problems"])  # and among the run's problems
    assert run("folder")["scored_now"] == 0  # and then kept
    assert "grouped into studies differently" not in warnings[-1]
    page, problems = _open(browser, out.with_name("report.html"))
    assert page.locator("#rows tr").count() == 2
    assert linked(page) == {png.name for png in pictures.glob("*.png")} and len(linked(page)) == 15
    assert not problems, problems


@pytest.mark.parametrize("name", ["wl#1 50%?.csv", "a b%20c.csv"])
def test_pictures_and_lists_open_whatever_characters_the_output_names_hold(tiny_model, tmp_path, browser, name):
    """A helper's trial (issue 21): with '#', '?' or '%' in the worklist's or the pictures folder's
    name every thumbnail, enlarged picture and list link failed (the links were raw paths)."""
    films = tmp_path / "in #2"
    films.mkdir()
    for film in sorted((CXR_DIR / "kermany_pediatric_224/test_abnormal").iterdir())[:3]:
        shutil.copy(film, films / film.name)
    out = tmp_path / "out?" / name
    result = CliRunner().invoke(cli, ["score", str(films), "--out", str(out), "--model", str(tiny_model),
                                      "--workers", "1", "--pictures", "all", "--residuals",
                                      str(out.parent / "case #7 100%"), "--study-key", "file"])
    assert result.exit_code == 0, result.output
    page, problems = _open(browser, out.with_suffix(".html"))
    _until(page, "[...document.querySelectorAll('#rows img')].every(i => i.complete)")
    loaded = page.locator("#rows img").evaluate_all("images => images.map(i => i.naturalWidth)")
    assert len(loaded) == 3 and all(width > 0 for width in loaded), loaded
    page.locator("#rows img").first.click()
    _until(page, "document.getElementById('viewer-image').naturalWidth > 0")
    page.keyboard.press("Escape")
    for link in page.locator("header a[href$='.csv']").all():  # the full lists open the files themselves
        target = page.evaluate("href => new URL(href, document.baseURI).pathname", link.get_attribute("href"))
        assert Path(urllib.parse.unquote(target)).is_file(), target
    assert not problems, problems


def test_a_rejected_film_is_shown_to_the_reader_and_an_unreadable_file_to_it(tmp_path, browser):
    """Issue 21 item 2: a film quality control rejected keeps its place in the reading list with a
    picture of the film (the reader judges the rejection); a study none of whose files could be read
    goes to IT's section, after the reading list; flagged studies come first."""
    from PIL import Image

    shipped = Path(__file__).parents[1] / "models" / "kermany-tiny"
    inputs = tmp_path / "in"
    films = {"normal": sorted((CXR_DIR / "kermany_pediatric_224/test_normal").iterdir())[:3],
             "pneumonia": sorted((CXR_DIR / "kermany_pediatric_224/val_abnormal").iterdir())[:3]}
    for label, paths in films.items():
        for index, path in enumerate(paths):
            (inputs / f"{label}{index}").mkdir(parents=True)
            shutil.copy(path, inputs / f"{label}{index}" / path.name)
    (inputs / "turned").mkdir()
    Image.open(films["normal"][0]).convert("L").transpose(Image.Transpose.ROTATE_180).save(inputs / "turned/a.png")
    (inputs / "broken").mkdir()
    (inputs / "broken" / "page.dcm").write_text("<html>not a film</html>")
    out = tmp_path / "out" / "report.csv"
    result = CliRunner().invoke(cli, ["score", str(inputs), "--out", str(out), "--model", str(shipped),
                                      "--workers", "1"])
    assert result.exit_code == 3, result.output  # the page that is not a film
    rows = _studies_csv(out.with_name("report_studies.csv"))
    sections = [row["study_section"] for row in rows]
    assert sections == sorted(sections, key=["reading", "unreadable", "skipped"].index)
    reading = [row for row in rows if row["study_section"] == "reading"]
    kinds = ["flagged" if row["study_flag"] == "true" else "not judged" if not row["study_score"] else "rest"
             for row in reading]
    assert kinds == sorted(kinds, key=["flagged", "not judged", "rest"].index) and "not judged" in kinds
    turned = next(row for row in reading if row["top_path"] == "turned/a.png")
    assert turned["images_rejected"] == "1" and (out.parent / turned["top_residual_png"]).is_file()
    assert [row["top_path"] for row in rows if row["study_section"] == "unreadable"] == ["broken/page.dcm"]

    page, problems = _open(browser, out.with_name("report.html"))
    assert page.locator("#rows tr").count() == len(reading)
    picture = page.locator("#rows img[alt='the film, not judged by the model']")
    assert picture.count() == 1
    picture.click()
    _until(page, "document.getElementById('viewer-image').naturalWidth > 0")
    page.keyboard.press("Escape")
    assert "broken/page.dcm" in page.locator("#it").inner_text() and page.locator("#it").is_visible()
    # the header counts the studies to read apart from those for IT (a helper read "39 studies" above "9 of 9")
    counts = page.locator("#counts").inner_text()
    assert f"Studies: {page.locator('#rows tr').count()} to read" in counts and "1 for IT" in counts, counts
    assert page.locator("#file-counts").inner_text().startswith("Files:")  # file counts apart, labelled
    assert "broken/page.dcm" not in page.locator("#rows").inner_text()
    assert not problems, problems


def test_on_a_phone_the_score_and_the_flag_stay_in_view(studies, tiny_model, tmp_path, browser):  # noqa: F811
    """Issue 21 item 4: at a phone's width (390 px) every row's score, z and flag are on screen without
    scrolling sideways, also beside a study with a 56-character accession number."""
    inputs = tmp_path / "in"
    shutil.copytree(studies, inputs)
    (inputs / "long").mkdir()
    shutil.copy(DICOM_DIR / "pylibjpeg-data/966_fixed.dcm", inputs / "long" / "IM1")
    out = tmp_path / "out" / "report.csv"
    result = CliRunner().invoke(cli, ["score", str(inputs), "--out", str(out), "--model", str(tiny_model),
                                      "--workers", "1"])
    assert result.exit_code in (0, 3), result.output  # 3: the film's codec may be missing
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(out.with_name("report.html").as_uri())
    page.wait_for_selector("#rows tr")
    labels = page.locator("#rows .bar + div")
    assert labels.count() >= 1
    for index in range(labels.count()):
        box = labels.nth(index).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "worklist-phone.png", full_page=True)
    # the enlarged picture keeps a readable height and scrolls sideways, not a 390 px strip of panels
    page.locator("#rows img").first.click()
    _until(page, "document.getElementById('viewer-image').naturalWidth > 0")
    picture = page.locator("#viewer-image").bounding_box()
    assert picture is not None and picture["height"] >= 0.5 * 844, picture
    assert page.evaluate("(f => f.scrollWidth > f.clientWidth)(document.getElementById('viewer-frame'))")
    # it opens on the map panel the thumbnail showed, not on the plain film at its left
    _until(page, "document.getElementById('viewer-frame').scrollLeft > 100")
    assert page.locator(".swipe-hint").is_visible() and not page.locator(".esc-hint").is_visible()
    assert "· z" in page.locator("#viewer-caption").inner_text()  # the verdict, which the map panel leaves out
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1
    page.screenshot(path=ARTIFACTS / "worklist-phone-picture.png")
    page.locator("#viewer-caption").click()  # a tap closes it
    assert not page.locator("#viewer").is_visible()


@pytest.mark.parametrize(("lines", "aspect"), [(2, 1.0), (5, 0.62), (9, 1.9)])
def test_a_rows_thumbnail_is_the_pictures_main_panel_at_a_readable_size(tiny_model, tmp_path, browser, lines,
                                                                         aspect):
    """Issue 21 item 4: the thumbnail shows the map panel alone (not the whole picture squeezed to a
    stamp), whatever the caption's length and the film's width/height ratio."""
    import numpy as np
    from PIL import Image

    from radscan.model.metadata import read_metadata
    from radscan.pictures import SCORE_MAP_SCALE_MAX, render_explanation, shows_reconstruction

    inputs = tmp_path / "in"
    for index, film in enumerate(sorted((CXR_DIR / "kermany_pediatric_224/test_abnormal").iterdir())[:2]):
        (inputs / f"study{index}").mkdir(parents=True)  # a study each: every picture is a row's thumbnail
        shutil.copy(film, inputs / f"study{index}" / film.name)
    out = tmp_path / "out" / "report.csv"
    result = CliRunner().invoke(cli, ["score", str(inputs), "--out", str(out), "--model", str(tiny_model),
                                      "--workers", "1", "--pictures", "all"])
    assert result.exit_code == 0, result.output
    # a picture whose main panel is known by its colour: a map saturated everywhere over a grey film
    picture = sorted((out.parent / "report_residuals").glob("*.png"))[0]
    kind = read_metadata(tiny_model)["config"]["score_kind"]  # the page lays pictures out by the model's kind
    drawn = render_explanation(np.full((128, 128), 128, np.uint8), np.full((128, 128), SCORE_MAP_SCALE_MAX),
                               np.zeros((128, 128)) if shows_reconstruction(kind) else None,
                               "\n".join(f"caption line {i}" for i in range(lines)), kind, aspect)
    Image.fromarray(drawn).save(picture)
    hot = (np.abs(drawn.astype(int) - drawn[-120, int(drawn.shape[1] * 0.6)]).sum(-1) < 6)  # inside the panel
    columns, rows = (np.flatnonzero(hot.sum(axis) > hot.sum(axis).max() / 2) for axis in (0, 1))
    expected = [columns[0], rows[0], columns[-1] + 1 - columns[0], rows[-1] + 1 - rows[0]]

    page, problems = _open(browser, out.with_name("report.html"))
    frame = page.locator(f"#rows .frame:has(img[src$='{picture.name}'])")
    frame.locator("img").evaluate("img => img.complete || new Promise(done => img.onload = done)")
    _until(page, "frame => frame.dataset.panel", frame.element_handle())
    shown = [float(value) for value in frame.get_attribute("data-panel").split(",")]
    assert shown == pytest.approx(expected, abs=1), (shown, expected)
    box = frame.bounding_box()
    assert box["height"] == pytest.approx(96, abs=1)  # the panel at 96 px high: about a fifth of its size
    assert box["width"] == pytest.approx(96 * expected[2] / expected[3], abs=2)
    assert not problems, problems
