"""The buttons under a finished clip (and the cancel buttons of ``/jobs``), alive across restarts.

Each button is a :class:`discord.ui.DynamicItem` whose ``custom_id`` carries the action and the job id
(``anim:retry:42``), so a click on a message posted before the bot restarted still finds its job: the
state lives in the database, not in memory.

    🔁 retry      the same picture and prompt, a new seed            (the clicker's new job)
    ➕ extend     5 more seconds, continuing from the last frame       (the clicker's new job)
    🎛 vary       the same picture and prompt, another camera move    (the clicker's new job)
    ℹ️ details    every parameter and where the clip came from        (only the clicker sees it)
    ⭐ publish    to the server's gallery                              (the clip's owner)
    🗑 delete     the clip and its messages                            (the owner or a moderator)
    ✖ cancel      an unfinished job (``/jobs``)                        (its owner)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

if TYPE_CHECKING:
    from bot.discord_bot import AnimaBot

#: action → (label, emoji, style)
ACTIONS: dict[str, tuple[str, str, discord.ButtonStyle]] = {
    "retry": ("Retry", "🔁", discord.ButtonStyle.secondary),
    "extend": ("Extend +5 s", "➕", discord.ButtonStyle.secondary),
    "vary": ("Variation", "🎛️", discord.ButtonStyle.secondary),
    "info": ("Details", "ℹ️", discord.ButtonStyle.secondary),
    "publish": ("Publish", "⭐", discord.ButtonStyle.primary),
    "delete": ("Delete", "🗑️", discord.ButtonStyle.danger),
    "cancel": ("Cancel", "✖️", discord.ButtonStyle.danger),
}
RESULT_ACTIONS = ("retry", "extend", "vary", "info", "publish", "delete")


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"anim:(?P<action>[a-z]+):(?P<job>[0-9]+)"):
    """One action on one job; what it does is :meth:`bot.actions.Actions.run`'s business."""

    def __init__(self, action: str, job_id: int, *, label: str | None = None) -> None:
        text, emoji, style = ACTIONS[action]
        super().__init__(discord.ui.Button(label=label or text, emoji=emoji, style=style,
                                           custom_id=f"anim:{action}:{job_id}"))
        self.action, self.job_id = action, job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button[Any], match: re.Match[str], /
    ) -> JobButton:
        """Rebuild the button from a click (also on messages posted before a restart)."""
        action = match["action"]
        if action not in ACTIONS:
            raise ValueError(f"unknown button action {action!r}")
        return cls(action, int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        """Do the action."""
        bot: AnimaBot = interaction.client  # type: ignore[assignment]
        await bot.actions.run(interaction, self.action, self.job_id)


def result_view(job_id: int) -> discord.ui.View:
    """The buttons under a finished clip."""
    view = discord.ui.View(timeout=None)
    for action in RESULT_ACTIONS:
        view.add_item(JobButton(action, job_id))
    return view


def cancel_view(job_ids: list[int]) -> discord.ui.View:
    """A cancel button per unfinished job (at most 25: five rows of five)."""
    view = discord.ui.View(timeout=None)
    for job_id in job_ids[:25]:
        view.add_item(JobButton("cancel", job_id, label=f"Cancel job {job_id}"))
    return view
