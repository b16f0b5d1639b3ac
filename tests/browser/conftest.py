"""Fixtures for the browser-level test: a fresh maubot (nothing deployed) and headless Chromium.

The plugin is deployed through maubot's own web admin UI, so this maubot gets no plugin, client
or instance from the harness. Chromium is Debian's (scripts/install-browser.sh installs it);
Playwright drives it, and never downloads a browser of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

from devstack.maubot import Maubot
from devstack.procs import REPO
from devstack.synapse import Synapse

CHROMIUM = os.environ.get("LAMBDA_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach Google's services,
# and those connections fail noisily on a machine without internet.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "test-output" / "browser"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def screenshots() -> Path:
    """test-output/browser/ (git-ignored), without the failure shot of an earlier run."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / "failure.png").unlink(missing_ok=True)
    return SCREENSHOTS


@pytest_asyncio.fixture(scope="module")
async def bare_maubot(synapse: Synapse) -> AsyncIterator[Maubot]:
    """A maubot of its own, started empty: no plugin, client or instance."""
    state = Path(tempfile.mkdtemp(prefix="lambda-maubot-ui-"))
    state.chmod(0o755)
    maubot = Maubot(state, synapse.url, synapse.shared_secret)
    try:
        maubot.start()
    except BaseException:
        maubot.stop()
        raise
    yield maubot
    await maubot.close()
    maubot.stop()
    if not os.environ.get("LAMBDA_KEEP_STATE"):
        shutil.rmtree(state, ignore_errors=True)


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser.sh")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    yield page
    await context.close()
