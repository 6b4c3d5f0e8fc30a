"""Render the report in a real headless Chromium (Debian's chromium + chromedriver).

`make test` installs both (`make browser`); the test fails, not skips, when
they are missing, so a CI machine without them cannot pass silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from tests.report.test_build import SECTIONS


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian's chromium and chromium-driver: `make browser`"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,2400"):
        opts.add_argument(arg)
    b = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    b.set_page_load_timeout(120)
    yield b
    b.quit()


def test_report_renders_in_chromium(reported, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(Path(reported["html"]).as_uri())
    assert browser.title.startswith("diffin report")
    headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert headings == SECTIONS
    tables = browser.find_elements(By.TAG_NAME, "table")
    assert len(tables) >= 5
    assert all(len(t.find_elements(By.TAG_NAME, "tr")) >= 2 for t in tables)
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 15
    decoded = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0);"
    )
    assert all(decoded), decoded
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    img = Image.open(shot).convert("L")
    assert img.size[0] >= 1000
    assert ImageStat.Stat(img).stddev[0] > 10  # not a blank page


def test_a_long_unbroken_caption_does_not_widen_the_page(browser, tmp_path):
    """Walkthrough: a 20,000-character caption without spaces (URLs and file names are
    like that) made the page 171,665 px wide, and was written twice (caption and alt)."""
    import io

    from pipeline.report.page import CAPTION_CHARS, gallery, page

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="JPEG")
    items = [{"jpeg": buf.getvalue(), "caption": "A" * 20_000, "score": 1.0}] * 3
    html = page("diffin report: captions", [("Most helpful pairs", gallery(items))])
    assert len(html) < 6 * CAPTION_CHARS + 10_000
    path = tmp_path / "captions.html"
    path.write_text(html)
    browser.get(path.as_uri())
    wide, view = browser.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth];"
    )
    assert wide <= view, (wide, view)
