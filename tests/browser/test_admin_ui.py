"""An operator deploys the plugin through maubot's web admin UI, in headless Chromium.

Log in, upload the built .mbp, create the bot's client, create the instance, change its config
in the editor and save; then a Matrix user talks to the bot and sees the new config in force,
without a restart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.async_api import Page, expect
from ruamel.yaml import YAML

from devstack.matrix import MatrixUser, invite_state_value
from devstack.maubot import PLUGIN_ID, Maubot, build_mbp
from devstack.synapse import Synapse
from tests.real.helpers import is_room_invite, is_space_invite, join_chat, notice_text

pytestmark = pytest.mark.real

INSTANCE_ID = "lambda"
CHAT_NAME = "Thread {n}"
UI_TIMEOUT_MS = 30_000
MATRIX_TIMEOUT_S = 120

# The config editor is Ace (react-ace, rendered into <div id="config">); Ace keeps its editor on
# the element, and the text on screen is only the visible part, so the text is read through it.
EDITOR_VALUE = "() => document.getElementById('config').env.editor.getValue()"
EDITOR_SHOW_LINE = """(needle) => {
    const editor = document.getElementById('config').env.editor
    const row = editor.getValue().split('\\n').findIndex(line => line.includes(needle))
    editor.scrollToLine(row, true, false, () => {})
    editor.gotoLine(row + 1, 0, false)
    return row
}"""


async def shot(page: Page, folder: Path, name: str) -> None:
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


async def test_deploy_through_the_admin_ui(
    page: Page, bare_maubot: Maubot, synapse: Synapse, screenshots: Path
) -> None:
    maubot = bare_maubot
    bot_id = synapse.register("lambda_ui", "bot-password")
    bot_login = synapse.login(bot_id, "bot-password")
    user_id = synapse.register("ui_operator_friend", "password")
    user = MatrixUser(synapse.url, user_id, synapse.login(user_id, "password")["access_token"])
    try:
        await _deploy(page, maubot, synapse, bot_id, bot_login, screenshots)
    except BaseException:
        await shot(page, screenshots, "failure")
        await user.close()
        raise

    try:
        # The instance runs with the config saved in the editor, as the management API says.
        await maubot.login()
        instance = await maubot.get_instance(INSTANCE_ID)
        assert instance["started"] is True and instance["enabled"] is True
        assert instance["type"] == PLUGIN_ID and instance["primary_user"] == bot_id
        assert CHAT_NAME in instance["config"]
        assert YAML(typ="safe").load(instance["config"])["spaces"]["chat_name"] == CHAT_NAME
        client = await maubot.api("GET", f"/client/{bot_id}")
        assert client["homeserver"] == synapse.url and client["autojoin"] is False

        # A user invites the bot and gets a Space whose first room has the new name...
        await user.dm(bot_id)
        space = await user.wait_for_invite(is_space_invite, timeout=MATRIX_TIMEOUT_S)
        room = await user.wait_for_invite(is_room_invite, timeout=MATRIX_TIMEOUT_S)
        assert invite_state_value(user.invites[room], "m.room.name", "name") == "Thread 1"
        await user.join(space)
        await join_chat(user, room, bot_id)  # the welcome comes on the join
        # ...and !new names the next one from the same template.
        reply = notice_text(await user.command(room, "!new", bot_id, timeout=MATRIX_TIMEOUT_S))
        assert "Thread 2" in reply, reply
    finally:
        await user.close()


async def _deploy(
    page: Page, maubot: Maubot, synapse: Synapse, bot_id: str, bot_login: dict, out: Path
) -> None:
    expect.set_options(timeout=UI_TIMEOUT_MS)
    sidebar = page.locator("nav.sidebar")

    # Log in.
    await page.goto(f"{maubot.url}/_matrix/maubot/")
    await page.locator("input[name=username]").fill("admin")
    await page.locator("input[name=password]").fill(maubot.admin_password)
    await shot(page, out, "01-login")
    await page.get_by_role("button", name="Log in").click()
    await expect(sidebar).to_be_visible()

    # Upload the plugin: the "+" beside "Plugins" opens an upload box with a file input.
    await sidebar.locator(".plugins.list .title a").click()
    await page.locator(".upload-box input.file-selector").set_input_files(build_mbp())
    await expect(page).to_have_url(re.compile(rf"#/plugin/{re.escape(PLUGIN_ID)}$"))
    await expect(page.locator("input#ID")).to_have_value(PLUGIN_ID)
    await expect(sidebar.locator(".plugins.list")).to_contain_text(PLUGIN_ID)
    await shot(page, out, "02-plugin-uploaded")

    # Create the bot's client.
    await sidebar.locator(".clients.list .title a").click()
    await page.locator("input[name=id]").fill(bot_id)
    # The homeserver is a creatable react-select listing maubot's configured homeservers by
    # name: typing Synapse's URL finds "local" (whose URL it is), and Enter takes it.
    await page.locator('[id="Homeserver"]').click()
    await page.keyboard.type(synapse.url)
    await page.keyboard.press("Enter")
    await page.locator("input[name=access_token]").fill(bot_login["access_token"])
    await page.locator("input[name=device_id]").fill(bot_login["device_id"])
    await page.locator("input[name=displayname]").fill("Lambda")
    # Autojoin off: the plugin itself decides whom to join (its access policy).
    autojoin = page.locator('.switch[id="Autojoin"]')
    await expect(autojoin).to_have_attribute("data-active", "true")
    await autojoin.click()
    await expect(autojoin).to_have_attribute("data-active", "false")
    await page.get_by_role("button", name="Create").click()
    await expect(page).to_have_url(re.compile(rf"#/client/{re.escape(bot_id)}$"))
    await expect(page.locator(".started-container .text")).to_have_text("Started")
    await shot(page, out, "03-client-created")

    # Create the instance of the plugin, bound to that client.
    await sidebar.locator(".instances.list .title a").click()
    await page.locator("input[name=id]").fill(INSTANCE_ID)
    primary_user = page.locator('[id="Primary user"]')
    await primary_user.click()
    await primary_user.get_by_text("Lambda", exact=True).last.click()
    plugin_type = page.locator('[id="Type"]')
    await plugin_type.click()
    await plugin_type.get_by_text(PLUGIN_ID, exact=True).last.click()
    await page.get_by_role("button", name="Create").click()
    await expect(page).to_have_url(re.compile(rf"#/instance/{INSTANCE_ID}$"))
    editor = page.locator("#config.ace_editor")
    await expect(editor).to_be_visible()
    await page.wait_for_function(f"({EDITOR_VALUE})().includes('chat_name:')")
    await shot(page, out, "04-instance-created")

    # Edit the config in the Ace editor as a person does: select all, put the new text in.
    # (maubot shows the config as the plugin saved it: re-indented, quotes dropped.)
    config = await page.evaluate(EDITOR_VALUE)
    assert re.search(r"^\s*chat_name: \W?Chat \{n\}\W?$", config, flags=re.M), config
    changed = re.sub(r"^(\s*chat_name:).*$", rf'\1 "{CHAT_NAME}"', config, count=1, flags=re.M)
    # The operator's plain test client can't decrypt: chat rooms stay unencrypted.
    changed = re.sub(r"^(\s*encryption:).*$", r"\1 never", changed, count=1, flags=re.M)
    await editor.click()
    await page.keyboard.press("ControlOrMeta+a")
    await page.keyboard.insert_text(changed)
    await page.wait_for_function(f"(want) => ({EDITOR_VALUE})() === want", arg=changed)
    async with page.expect_response(
        lambda r: r.request.method == "PUT" and r.url.endswith(f"/instance/{INSTANCE_ID}")
    ) as saved:
        await page.get_by_role("button", name="Save").click()
    assert (await saved.value).ok
    await expect(page.locator(".instance .error")).to_have_text("")

    # Reload: the editor shows the config as maubot stored it.
    await page.reload()
    await expect(editor).to_be_visible()
    await page.wait_for_function(f"({EDITOR_VALUE})().includes('{CHAT_NAME}')")
    await page.evaluate(EDITOR_SHOW_LINE, "chat_name:")
    await expect(editor).to_contain_text(CHAT_NAME)
    await shot(page, out, "05-config-saved")
