"""A Discord emulator on 127.0.0.1 that the real discord.py client logs in to, syncs with and is driven through.

One aiohttp app on a free port serves the REST API (``/api/v10/*``), the gateway websocket (``/gateway``) and
its own CDN (``/attachments/{channel}/{id}/{filename}?ex=&is=&hm=``), speaking Discord's wire protocol as
discord.py 2.7 expects it (see ``/work/shared/reference/discord.md``). The test plays Discord's users::

    async with DiscordEmulator() as emu:
        guild = emu.add_guild("Test")
        general = emu.add_channel(guild, "general")
        alice = emu.add_member(guild, "alice")
        with point_discord_py_at(emu):          # or run the bot as a subprocess with env=emu.env
            task = asyncio.create_task(bot.start(emu.token))
            await emu.wait_for(lambda: emu.identifies)   # not bot.wait_until_ready(): see discord.md §2.6
            ...
            inter = emu.send_slash(alice, general, "animate", {"prompt": "dance"},
                                   attachments={"image": ("cat.png", png_bytes)})
            await emu.wait_for(("PATCH", r"/messages/@original$"))
            [reply] = emu.messages_in(general)
            assert reply.files["result.mp4"] and inter.acked_type == 5 and inter.ack_latency < 3

Test API (all synchronous except ``start``/``stop``/``wait_for``/``drop_gateway``; events are queued to the bot's
socket and written by the event loop, so follow them with ``await emu.wait_for(...)``):

============================================  ==================================================================
world                                         ``add_guild``, ``add_channel``, ``add_user``, ``add_member``,
                                              ``add_role``, ``dm_channel``, ``bot_user``, ``bot_role(guild)``
permissions                                   ``set_permissions(channel, user_or_role, allow=, deny=)`` (a
                                              channel overwrite), ``set_role_permissions(role, perms)``,
                                              ``permissions_in(channel, user)``; constants in ``Permission``
CDN                                           ``upload_attachment(channel, filename, data)`` → ``Attachment``
                                              (``.payload()`` is the resolved attachment), ``expire_attachment``
users act                                     ``send_slash``, ``send_autocomplete``, ``click``, ``select``,
                                              ``react``, ``unreact``, ``post_message``; each returns the object
gateway                                       ``drop_gateway(code, resumable=)``, ``request_reconnect()``,
                                              ``identifies``, ``resumes``, ``replayed``, ``identify_payloads``,
                                              ``events``, ``undelivered`` (user actions while no session)
interactions                                  ``interaction(id)`` → ``Interaction`` (``acked_type``,
                                              ``ack_latency``, ``original``, ``followups``, ``choices``,
                                              ``rejections``), ``expire_token(inter)``; knobs ``ack_deadline``,
                                              ``token_ttl`` (both settable at any time)
messages                                      ``messages_in(channel, ephemeral=False)``, ``message(id)``:
                                              ``Message`` (``content``, ``files`` name → bytes, ``attachments``,
                                              ``components``, ``custom_ids``, ``nonce``, ``history`` of edits,
                                              ``reactions`` emoji → user ids, ``webhook_id``)
commands                                      ``commands(guild=None)``, ``sync_count(guild=None)``, ``syncs``
rate limits                                   ``inject_429(route_regex, retry_after, global_=, times=,
                                              method=)``, ``add_bucket(route_regex, limit, per)``
log                                           ``requests`` (every HTTP call, with status and error code),
                                              ``unexpected`` (unknown routes, answered 404), ``mark()``,
                                              ``await wait_for(predicate | (method, path_regex), timeout, since=)``
============================================  ==================================================================

What it enforces (the answers real Discord gives, so bots break here before they break in production):

- ``Authorization: Bot <token>`` on bot routes (401 code 0); IDENTIFY with a wrong token closes 4004;
  privileged intents not in ``privileged_intents`` close 4014.
- Interaction callback later than ``ack_deadline`` (3 s) after the interaction was created → 404 10062; a second
  acknowledgement → 400 40060; a response type that does not fit the interaction (6/7 on a slash command,
  anything but 8 on autocomplete) → 400 50035. Webhook routes: unknown token or not yet acknowledged → 404 10015;
  older than ``token_ttl`` (900 s), ``expire_token()``-ed or never acknowledged in time → 401 50027. The first
  follow-up after a thinking defer fills the loading message, as on Discord.
- Messages: content ≤ 2000, ≤ 10 embeds (≤ 6000 characters), ≤ 10 attachments, each file ≤ the guild's or the
  interaction's ``attachment_size_limit`` (413 40005), ≤ 5 action rows × 5 buttons (a select alone in its row),
  ``custom_id`` 1-100 and unique, link buttons with ``url`` and no ``custom_id``, no empty message (50006);
  ``attachments`` entries must name an upload or a kept attachment; edits keep only the attachments listed.
- Channel routes: VIEW_CHANNEL (else 403 50001 Missing Access, as on Discord), SEND_MESSAGES, ATTACH_FILES for
  files, READ_MESSAGE_HISTORY to read/react, ADD_REACTIONS for a new emoji, MANAGE_MESSAGES to delete others'
  messages (403 50013); only the author edits a message (403 50005); ephemeral messages are invisible there.
- ``nonce`` + ``enforce_nonce``: the same nonce from the same author within ``nonce_window`` returns the first
  message instead of creating another.
- Command sync: names (``^[-_'\\p{L}\\p{N}]{1,32}$``, lower case), descriptions 1-100, ≤ 25 options and choices,
  required options first, unique names, choices xor autocomplete, sub-commands not mixed with options → 400 50035
  with Discord's nested ``errors`` (discord.py turns it into ``CommandSyncFailure``). Command ids are stable
  across syncs.
- 429s carry ``Via``, ``Retry-After``, ``X-RateLimit-Scope`` and a JSON ``retry_after``/``global``; after a global
  429, every bot-token request inside the window gets 429 too (interaction routes are exempt, as on Discord).
  Buckets send the full ``X-RateLimit-*`` set on every answer.
- CDN URLs must keep their signature (``hm``) and are 404 after ``cdn_ttl`` or ``expire_attachment``.
- Gateway: HELLO, heartbeat ACKs, READY + one GUILD_CREATE per guild (members only with GUILD_MEMBERS), intent
  filtering of MESSAGE_* and reactions, message content blanked without MESSAGE_CONTENT (except the bot's own
  messages, mentions and DMs), RESUME replaying every event the bot missed (op 9 when the session is gone).

What it does NOT emulate: voice, threads and forum channels, stickers, polls, scheduled events, member chunking (op
8), presences, guild/role/channel management routes (rename, create, delete) beyond what the test API does, audit-
log reasons, modal submission (a type 9 callback is accepted and recorded in ``Interaction.modal``, no submit is
sent back), context-menu invocations, select menus other than string selects, entitlements and premium responses,
HTTP-endpoint interactions (Ed25519), sharding beyond echoing ``shard``, zlib/zstd compressed frames (plain text
frames only, which discord.py accepts), more than one gateway session at a time (a new IDENTIFY ends the previous
session, so two bot replicas cannot both receive events), heartbeat-timeout disconnects (4009), the 50 req/s global
limit and the invalid-request ban (the count is in ``invalid_requests``), 200 command creates a day, mention parsing
beyond ``<@id>``, embeds' rendering and link unfurling, the message cache limits, and file type sniffing
(``content_type`` comes from the file name).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import itertools
import json
import mimetypes
import re
import secrets
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from aiohttp import WSMsgType, web

from .server import LocalServer

__all__ = [
    "Attachment",
    "Channel",
    "DiscordEmulator",
    "Guild",
    "Intent",
    "Interaction",
    "Member",
    "Message",
    "MessageVersion",
    "Permission",
    "Request",
    "Role",
    "UploadedFile",
    "User",
    "point_discord_py_at",
]

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
MIB = 1024 * 1024
MAX_CONTENT = 2000
MAX_FILES = 10
MAX_EMBEDS = 10


class Permission(enum.IntFlag):
    """Discord permission bits (the ones a bot meets; every other bit still works as a plain int)."""

    CREATE_INSTANT_INVITE = 1 << 0
    KICK_MEMBERS = 1 << 1
    BAN_MEMBERS = 1 << 2
    ADMINISTRATOR = 1 << 3
    MANAGE_CHANNELS = 1 << 4
    MANAGE_GUILD = 1 << 5
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    SEND_TTS_MESSAGES = 1 << 12
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    USE_EXTERNAL_EMOJIS = 1 << 18
    MANAGE_ROLES = 1 << 28
    USE_APPLICATION_COMMANDS = 1 << 31
    SEND_MESSAGES_IN_THREADS = 1 << 38


ALL_PERMISSIONS = (1 << 53) - 1
DEFAULT_EVERYONE = (
    Permission.CREATE_INSTANT_INVITE
    | Permission.ADD_REACTIONS
    | Permission.VIEW_CHANNEL
    | Permission.SEND_MESSAGES
    | Permission.EMBED_LINKS
    | Permission.ATTACH_FILES
    | Permission.READ_MESSAGE_HISTORY
    | Permission.USE_EXTERNAL_EMOJIS
    | Permission.USE_APPLICATION_COMMANDS
    | Permission.SEND_MESSAGES_IN_THREADS
)
DEFAULT_BOT = DEFAULT_EVERYONE
# Without SEND_MESSAGES these are implicitly denied too (Discord's permission resolution).
_NEEDS_SEND = (
    Permission.SEND_TTS_MESSAGES | Permission.MENTION_EVERYONE | Permission.ATTACH_FILES | Permission.EMBED_LINKS
)


class Intent(enum.IntFlag):
    """Gateway intent bits used by the emulator's event filter."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    GUILD_MESSAGE_REACTIONS = 1 << 10
    DIRECT_MESSAGES = 1 << 12
    DIRECT_MESSAGE_REACTIONS = 1 << 13
    MESSAGE_CONTENT = 1 << 15


PRIVILEGED_INTENTS = Intent.GUILD_MEMBERS | Intent.GUILD_PRESENCES | Intent.MESSAGE_CONTENT

# Message flags.
SUPPRESS_EMBEDS = 1 << 2
EPHEMERAL = 1 << 6
LOADING = 1 << 7
SUPPRESS_NOTIFICATIONS = 1 << 12
IS_COMPONENTS_V2 = 1 << 15

# Interaction types and callback types.
PING, APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 1, 2, 3, 4, 5
_ALLOWED_CALLBACKS = {
    APPLICATION_COMMAND: {4, 5, 9},
    MESSAGE_COMPONENT: {4, 5, 6, 7, 9},
    AUTOCOMPLETE: {8},
    MODAL_SUBMIT: {4, 5, 6, 7},
}
_SELECT_TYPES = {3, 5, 6, 7, 8}
_USER_EVENTS = {"INTERACTION_CREATE", "MESSAGE_CREATE", "MESSAGE_REACTION_ADD", "MESSAGE_REACTION_REMOVE"}


class DiscordError(Exception):
    """An error answer in Discord's shape: ``{"code", "message", "errors"?}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        errors: dict | None = None,
        headers: dict[str, str] | None = None,
        body: dict | None = None,
    ) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message, self.errors = status, code, message, errors
        self.headers = headers or {}
        self.body = body

    def payload(self) -> dict:
        """The JSON body Discord sends for this error."""
        if self.body is not None:
            return self.body
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


class _UnknownRoute(Exception):
    """No route of the emulator matches: answered 404 and recorded in ``unexpected``."""


def _invalid_form(errors: dict) -> DiscordError:
    return DiscordError(400, 50035, "Invalid Form Body", errors)


def _add_error(errors: dict, path: tuple[str | int, ...], code: str, message: str) -> None:
    node = errors
    for key in path:
        node = node.setdefault(str(key), {})
    node.setdefault("_errors", []).append({"code": code, "message": message})


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _id(obj: Any) -> int:
    """The snowflake of an emulator object, a discord.py object or an id."""
    if isinstance(obj, int):
        return obj
    if isinstance(obj, str):
        return int(obj)
    return int(obj.id)


# --------------------------------------------------------------------------------------------------- the world


@dataclass(eq=False)
class User:
    """A Discord user (``bot=True`` for the application's bot user)."""

    id: int
    username: str
    global_name: str | None = None
    bot: bool = False

    def payload(self) -> dict:
        """The user object."""
        data: dict[str, Any] = {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "public_flags": 0,
        }
        if self.bot:
            data["bot"] = True
        return data

    @property
    def mention(self) -> str:
        """``<@id>``."""
        return f"<@{self.id}>"


@dataclass(eq=False)
class Role:
    """A guild role; the ``@everyone`` role has the guild's id."""

    id: int
    guild_id: int
    name: str
    permissions: int
    position: int = 0
    managed: bool = False
    bot_id: int | None = None

    def payload(self) -> dict:
        """The role object."""
        data: dict[str, Any] = {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(int(self.permissions)),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "managed": self.managed,
            "mentionable": False,
            "flags": 0,
        }
        if self.bot_id is not None:
            data["tags"] = {"bot_id": str(self.bot_id)}
        return data


@dataclass(eq=False)
class Channel:
    """A guild text channel (type 0) or a DM (type 1); ``overwrites`` maps a role/user id to ``(kind, allow, deny)``."""

    id: int
    name: str
    type: int = 0
    guild_id: int | None = None
    position: int = 0
    overwrites: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    recipient: User | None = None
    message_ids: list[int] = field(default_factory=list)

    def payload(self) -> dict:
        """The channel object."""
        if self.type == 1:
            return {
                "id": str(self.id),
                "type": 1,
                "recipients": [self.recipient.payload()] if self.recipient else [],
                "last_message_id": str(self.message_ids[-1]) if self.message_ids else None,
                "flags": 0,
            }
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [
                {"id": str(target), "type": kind, "allow": str(int(allow)), "deny": str(int(deny))}
                for target, (kind, allow, deny) in self.overwrites.items()
            ],
            "nsfw": False,
            "parent_id": None,
            "topic": None,
            "rate_limit_per_user": 0,
            "last_message_id": str(self.message_ids[-1]) if self.message_ids else None,
            "flags": 0,
        }


@dataclass(eq=False)
class Member:
    """A user's membership in a guild; ``roles`` excludes ``@everyone``."""

    user: User
    guild_id: int
    roles: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: datetime = field(default_factory=_now)

    @property
    def id(self) -> int:
        """The user's id."""
        return self.user.id

    def payload(self, permissions: int | None = None) -> dict:
        """The guild member object (with ``permissions`` when given, as in interactions)."""
        data: dict[str, Any] = {
            "user": self.user.payload(),
            "roles": [str(r) for r in self.roles],
            "joined_at": _iso(self.joined_at),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": self.nick,
            "avatar": None,
            "pending": False,
            "premium_since": None,
            "communication_disabled_until": None,
        }
        if permissions is not None:
            data["permissions"] = str(int(permissions))
        return data


@dataclass(eq=False)
class Guild:
    """A guild: roles (``@everyone`` first), channels and members by user id."""

    id: int
    name: str
    owner_id: int
    attachment_size_limit: int
    premium_tier: int = 0
    roles: dict[int, Role] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)

    @property
    def everyone(self) -> Role:
        """The ``@everyone`` role."""
        return self.roles[self.id]


@dataclass(eq=False)
class Attachment:
    """A file on the emulator's CDN, from a user's upload or a bot's message."""

    id: int
    channel_id: int
    filename: str
    data: bytes
    content_type: str
    url: str
    description: str | None = None
    ephemeral: bool = False
    width: int | None = None
    height: int | None = None
    expires_at: float | None = None
    expired: bool = False

    @property
    def size(self) -> int:
        """The size in bytes."""
        return len(self.data)

    def payload(self) -> dict:
        """The attachment object (as in ``resolved.attachments`` and in messages)."""
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.description is not None:
            data["description"] = self.description
        if self.width is not None:
            data["width"], data["height"] = self.width, self.height
        if self.ephemeral:
            data["ephemeral"] = True
        return data


@dataclass(frozen=True)
class MessageVersion:
    """A message as it was before an edit."""

    content: str
    embeds: list
    components: list
    attachments: list[Attachment]
    flags: int
    at: datetime


@dataclass(eq=False)
class Message:
    """A message as stored by the emulator, with its files' bytes, components and edit history."""

    id: int
    channel_id: int
    guild_id: int | None
    author: User
    content: str = ""
    embeds: list = field(default_factory=list)
    components: list = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    type: int = 0
    nonce: str | int | None = None
    tts: bool = False
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_metadata: dict | None = None
    message_reference: dict | None = None
    mentions: list[User] = field(default_factory=list)
    created_at: datetime = field(default_factory=_now)
    created_mono: float = field(default_factory=time.monotonic)
    edited_at: datetime | None = None
    history: list[MessageVersion] = field(default_factory=list)
    reactions: dict[str, list[int]] = field(default_factory=dict)
    deleted: bool = False

    @property
    def ephemeral(self) -> bool:
        """Only the interaction's user sees it."""
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        """A thinking placeholder left by a deferred interaction, not yet edited."""
        return bool(self.flags & LOADING)

    @property
    def files(self) -> dict[str, bytes]:
        """The attachments' bytes by file name."""
        return {a.filename: a.data for a in self.attachments}

    @property
    def custom_ids(self) -> list[str]:
        """Every component ``custom_id`` on the message, in order."""
        return [c["custom_id"] for c in _walk_components(self.components) if "custom_id" in c]

    @property
    def buttons(self) -> list[dict]:
        """Every button component, in order."""
        return [c for c in _walk_components(self.components) if c.get("type") == 2]

    def version(self) -> MessageVersion:
        """The current state as a ``MessageVersion``."""
        return MessageVersion(
            self.content,
            json.loads(json.dumps(self.embeds)),
            json.loads(json.dumps(self.components)),
            list(self.attachments),
            self.flags,
            self.edited_at or self.created_at,
        )


@dataclass(eq=False)
class Interaction:
    """An interaction the emulator sent, and how the bot answered it."""

    id: int
    token: str
    type: int
    user: User
    channel_id: int
    guild_id: int | None
    data: dict
    payload: dict
    attachment_size_limit: int
    message_id: int | None = None
    created_at: float = field(default_factory=time.monotonic)
    dispatched_at: float | None = None
    acked_type: int | None = None
    acked_at: float | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    choices: list | None = None
    modal: dict | None = None
    token_expired: bool = False
    rejections: list[tuple[int, int]] = field(default_factory=list)
    _messages: dict[int, Message] = field(default_factory=dict, repr=False)

    @property
    def acked(self) -> bool:
        """The bot answered the interaction callback in time."""
        return self.acked_type is not None

    @property
    def ack_latency(self) -> float | None:
        """Seconds from the INTERACTION_CREATE frame being written to the accepted callback."""
        if self.acked_at is None:
            return None
        return self.acked_at - (self.dispatched_at if self.dispatched_at is not None else self.created_at)

    @property
    def original(self) -> Message | None:
        """The original response message (the loading message after a thinking defer)."""
        return self._messages.get(self.original_message_id) if self.original_message_id else None

    @property
    def followups(self) -> list[Message]:
        """Follow-up messages, in order."""
        return [self._messages[i] for i in self.followup_ids]


@dataclass(eq=False)
class UploadedFile:
    """A ``files[n]`` part of a multipart request."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(eq=False)
class Request:
    """One HTTP request to the emulator and the answer it got."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float
    json: Any = None
    files: list[UploadedFile] = field(default_factory=list)
    status: int | None = None
    code: int | None = None
    response: Any = None

    def __repr__(self) -> str:
        code = f" code={self.code}" if self.code else ""
        return f"<Request {self.method} {self.path} -> {self.status}{code}>"


@dataclass(eq=False)
class GatewayEvent:
    """A dispatch (op 0) sent, or queued for, the bot."""

    type: str
    seq: int
    data: dict


@dataclass(eq=False)
class _Injection:
    pattern: re.Pattern
    method: str | None
    retry_after: float
    global_: bool
    times: int
    hits: int = 0


@dataclass(eq=False)
class _Bucket:
    pattern: re.Pattern
    method: str | None
    limit: int
    per: float
    hash: str
    windows: dict[str, tuple[float, int]] = field(default_factory=dict)


class _Connection:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[tuple[str, Callable[[], None] | None]] = asyncio.Queue()
        self.session: _Session | None = None
        self.closed = False
        self.dropped = False  # closed by the emulator (drop_gateway), so the session stays resumable
        self.writer: asyncio.Task | None = None

    def send(self, frame: dict | str, on_sent: Callable[[], None] | None = None) -> None:
        if not self.closed:
            self.queue.put_nowait((frame if isinstance(frame, str) else json.dumps(frame), on_sent))


@dataclass(eq=False)
class _Session:
    id: str
    intents: int
    shard: list | None
    seq: int = 0
    valid: bool = True
    conn: _Connection | None = None
    backlog: deque = field(default_factory=lambda: deque(maxlen=5000))


def _walk_components(components: list) -> Iterator[dict]:
    for component in components or []:
        if not isinstance(component, dict):
            continue
        yield component
        yield from _walk_components(component.get("components") or [])
        for key in ("component", "accessory"):
            if isinstance(component.get(key), dict):
                yield from _walk_components([component[key]])


_NAME_PUNCTUATION = set("-_'")


def _valid_command_name(name: Any, *, chat_input: bool = True) -> bool:
    """Discord's ``^[-_'\\p{L}\\p{N}\\p{sc=Deva}\\p{sc=Thai}]{1,32}$``, lower case, for slash commands/options."""
    if not isinstance(name, str) or not 1 <= len(name) <= 32:
        return False
    if not chat_input:
        return True
    for char in name:
        devanagari_or_thai = 0x0900 <= ord(char) <= 0x097F or 0x0E00 <= ord(char) <= 0x0E7F
        if not (char in _NAME_PUNCTUATION or unicodedata.category(char)[0] in "LN" or devanagari_or_thai):
            return False
        if char.lower() != char:
            return False
    return True


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    try:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None, None


# ------------------------------------------------------------------------------------------------- the emulator


class DiscordEmulator(LocalServer):
    """Discord's REST API, gateway and CDN on 127.0.0.1; see the module docstring for the test API.

    ``DiscordEmulator(token="fake", ack_deadline=3.0, token_ttl=900.0)`` then ``async with emu:`` (or
    ``await emu.start()`` / ``await emu.stop()``). ``ack_deadline``, ``token_ttl``, ``nonce_window`` and
    ``cdn_ttl`` are plain attributes: shrink them in a test to play minutes in milliseconds.
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        bot_name: str = "animabot",
        ack_deadline: float = 3.0,
        token_ttl: float = 900.0,
        nonce_window: float = 300.0,
        cdn_ttl: float | None = None,
        heartbeat_interval_ms: int = 41250,
        privileged_intents: int = 0,
    ) -> None:
        super().__init__()
        self.token = token
        self.ack_deadline = ack_deadline
        self.token_ttl = token_ttl
        self.nonce_window = nonce_window
        self.cdn_ttl = cdn_ttl
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.privileged_intents = privileged_intents

        self._last_snowflake = 0
        self._increment = itertools.count()
        self.application_id = self._snowflake()
        self.bot_user = User(self._snowflake(), bot_name, None, bot=True)
        self.owner = User(self._snowflake(), "owner")
        self._sign_key = secrets.token_bytes(16)

        self.users: dict[int, User] = {self.bot_user.id: self.bot_user, self.owner.id: self.owner}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.roles: dict[int, Role] = {}
        self.attachments: dict[int, Attachment] = {}
        self._messages: dict[int, Message] = {}
        self.interactions: dict[int, Interaction] = {}
        self._by_token: dict[str, Interaction] = {}
        self._nonces: dict[tuple[int, str], int] = {}
        self._commands: dict[int | None, list[dict]] = {}
        self._command_ids: dict[tuple[int | None, int, str], int] = {}
        self.syncs: list[tuple[int | None, list[dict]]] = []

        self.requests: list[Request] = []
        self.unexpected: list[Request] = []
        self.events: list[GatewayEvent] = []
        self.undelivered: list[tuple[str, dict]] = []
        self.identify_payloads: list[dict] = []
        self.identifies = 0
        self.resumes = 0
        self.replayed = 0
        self.connections = 0
        self._injections: list[_Injection] = []
        self._buckets: list[_Bucket] = []
        self._global_block_until = 0.0

        self._session: _Session | None = None
        self._conns: set[_Connection] = set()
        self._changed = asyncio.Event()
        self._routes = self._build_routes()

    # ------------------------------------------------------------------------------------------ lifecycle

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * MIB)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _on_stop(self) -> None:
        """Close every websocket (1001, going away) before the server stops listening."""
        for conn in list(self._conns):
            conn.closed = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(code=1001, message=b"emulator stopping"), 1.0)
            if conn.writer is not None:
                conn.writer.cancel()

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """The value for ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` (as a ``yarl.URL``)."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a bot subprocess: ``DISCORD_TOKEN``, ``DISCORD_API_BASE``, ``DISCORD_GATEWAY_URL``."""
        return {"DISCORD_TOKEN": self.token, "DISCORD_API_BASE": self.api_base, "DISCORD_GATEWAY_URL": self.gateway_url}

    # ---------------------------------------------------------------------------------------- building the world

    def _snowflake(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        value = max((ms << 22) | (1 << 17) | (next(self._increment) & 0xFFF), self._last_snowflake + 1)
        self._last_snowflake = value
        return value

    def add_user(self, username: str, *, global_name: str | None = None, bot: bool = False) -> User:
        """A new user (not yet in any guild)."""
        user = User(self._snowflake(), username, global_name if global_name is not None else username.title(), bot)
        self.users[user.id] = user
        return user

    def add_guild(
        self,
        name: str = "Test",
        *,
        owner: User | None = None,
        premium_tier: int = 0,
        attachment_size_limit: int | None = None,
        everyone_permissions: int = DEFAULT_EVERYONE,
        bot_permissions: int = DEFAULT_BOT,
    ) -> Guild:
        """A guild with ``@everyone``, the bot as a member with its managed role, and its owner."""
        owner = owner or self.owner
        if attachment_size_limit is None:
            attachment_size_limit = {2: 50 * MIB, 3: 100 * MIB}.get(premium_tier, 10 * MIB)
        guild = Guild(self._snowflake(), name, owner.id, attachment_size_limit, premium_tier)
        self.guilds[guild.id] = guild
        everyone = Role(guild.id, guild.id, "@everyone", int(everyone_permissions))
        guild.roles[everyone.id] = self.roles[everyone.id] = everyone
        bot_role = Role(
            self._snowflake(), guild.id, self.bot_user.username, int(bot_permissions), 1, True, self.bot_user.id
        )
        guild.roles[bot_role.id] = self.roles[bot_role.id] = bot_role
        guild.members[self.bot_user.id] = Member(self.bot_user, guild.id, [bot_role.id])
        guild.members[owner.id] = Member(owner, guild.id)
        self._dispatch("GUILD_CREATE", self._guild_create_payload(guild), intent=Intent.GUILDS)
        return guild

    def bot_role(self, guild: Guild | int) -> Role:
        """The bot's managed role in ``guild``."""
        guild = self.guilds[_id(guild)]
        return next(r for r in guild.roles.values() if r.bot_id == self.bot_user.id)

    def add_channel(self, guild: Guild | int, name: str = "general", *, type: int = 0) -> Channel:
        """A text channel in ``guild`` (dispatches CHANNEL_CREATE when the bot is connected)."""
        guild = self.guilds[_id(guild)]
        channel = Channel(self._snowflake(), name, type, guild.id, len(guild.channels))
        guild.channels[channel.id] = self.channels[channel.id] = channel
        self._dispatch("CHANNEL_CREATE", channel.payload(), intent=Intent.GUILDS)
        return channel

    def dm_channel(self, user: User | int) -> Channel:
        """The DM channel between the bot and ``user`` (made on first use)."""
        user = self.users[_id(user)]
        for channel in self.channels.values():
            if channel.type == 1 and channel.recipient is user:
                return channel
        channel = Channel(self._snowflake(), "", 1, None, recipient=user)
        self.channels[channel.id] = channel
        return channel

    def add_role(self, guild: Guild | int, name: str, permissions: int = 0) -> Role:
        """A role in ``guild`` (dispatches GUILD_ROLE_CREATE)."""
        guild = self.guilds[_id(guild)]
        role = Role(self._snowflake(), guild.id, name, int(permissions), len(guild.roles))
        guild.roles[role.id] = self.roles[role.id] = role
        self._dispatch("GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role.payload()}, intent=Intent.GUILDS)
        return role

    def add_member(
        self,
        guild: Guild | int,
        user: User | str,
        *,
        roles: tuple[Role, ...] = (),
        permissions: int | None = None,
        nick: str | None = None,
    ) -> Member:
        """Put ``user`` (or a new user of that name) in ``guild``; ``permissions`` adds a personal role."""
        guild = self.guilds[_id(guild)]
        if isinstance(user, str):
            user = self.add_user(user)
        role_ids = [r.id for r in roles]
        if permissions is not None:
            role_ids.append(self.add_role(guild, f"{user.username}-role", permissions).id)
        member = Member(user, guild.id, role_ids, nick)
        guild.members[user.id] = member
        self._dispatch("GUILD_MEMBER_ADD", member.payload() | {"guild_id": str(guild.id)}, intent=Intent.GUILD_MEMBERS)
        return member

    def set_role_permissions(self, role: Role | int, permissions: int) -> None:
        """Change a role's permissions (dispatches GUILD_ROLE_UPDATE)."""
        role = self.roles[_id(role)]
        role.permissions = int(permissions)
        self._dispatch(
            "GUILD_ROLE_UPDATE", {"guild_id": str(role.guild_id), "role": role.payload()}, intent=Intent.GUILDS
        )

    def set_permissions(self, channel: Channel | int, target: Any, *, allow: int = 0, deny: int = 0) -> None:
        """A channel permission overwrite for a user/member, a role, or ``@everyone`` (pass the guild).

        ``allow=0, deny=0`` removes the overwrite. Dispatches CHANNEL_UPDATE, so discord.py's
        ``channel.permissions_for(guild.me)`` agrees with what the emulator enforces.
        """
        channel = self.channels[_id(channel)]
        target_id = _id(target)
        kind = 0 if target_id in self.roles else 1
        if allow == 0 and deny == 0:
            channel.overwrites.pop(target_id, None)
        else:
            channel.overwrites[target_id] = (kind, int(allow), int(deny))
        self._dispatch("CHANNEL_UPDATE", channel.payload(), intent=Intent.GUILDS)

    def permissions_in(self, channel: Channel | int, user: User | int) -> int:
        """The permissions ``user`` has in ``channel`` (Discord's resolution: roles, then overwrites)."""
        channel = self.channels[_id(channel)]
        user_id = _id(user)
        if channel.guild_id is None:
            return ALL_PERMISSIONS & ~(Permission.ADMINISTRATOR | Permission.MANAGE_MESSAGES)
        guild = self.guilds[channel.guild_id]
        member = guild.members.get(user_id)
        if member is None:
            return 0
        if user_id == guild.owner_id:
            return ALL_PERMISSIONS
        perms = guild.everyone.permissions
        for role_id in member.roles:
            perms |= guild.roles[role_id].permissions
        if perms & Permission.ADMINISTRATOR:
            return ALL_PERMISSIONS
        if guild.id in channel.overwrites:
            _, allow, deny = channel.overwrites[guild.id]
            perms = (perms & ~deny) | allow
        allow_roles = deny_roles = 0
        for role_id in member.roles:
            if role_id in channel.overwrites:
                _, allow, deny = channel.overwrites[role_id]
                allow_roles |= allow
                deny_roles |= deny
        perms = (perms & ~deny_roles) | allow_roles
        if user_id in channel.overwrites:
            _, allow, deny = channel.overwrites[user_id]
            perms = (perms & ~deny) | allow
        if not perms & Permission.VIEW_CHANNEL:
            return 0
        if not perms & Permission.SEND_MESSAGES:
            perms &= ~_NEEDS_SEND
        return perms

    def set_attachment_size_limit(self, guild: Guild | int, limit: int) -> None:
        """The per-file upload limit in ``guild`` (also sent as ``attachment_size_limit`` in its interactions)."""
        self.guilds[_id(guild)].attachment_size_limit = limit

    # ------------------------------------------------------------------------------------------------- the CDN

    def _cdn_url(self, channel_id: int, attachment_id: int, filename: str, expires: float) -> str:
        issued = int(time.time())
        ex = f"{int(expires):x}"
        signed = hashlib.sha256(self._sign_key + f"{attachment_id}:{ex}".encode()).hexdigest()
        return f"{self.base_url}/attachments/{channel_id}/{attachment_id}/{filename}?ex={ex}&is={issued:x}&hm={signed}&"

    def _new_attachment(
        self,
        channel_id: int,
        filename: str,
        data: bytes,
        *,
        content_type: str | None = None,
        description: str | None = None,
        ephemeral: bool = False,
    ) -> Attachment:
        attachment_id = self._snowflake()
        expires = time.time() + (self.cdn_ttl if self.cdn_ttl is not None else 86400)
        content_type = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        width = height = None
        if content_type.startswith("image/"):
            width, height = _image_size(data)
        attachment = Attachment(
            attachment_id,
            channel_id,
            filename,
            bytes(data),
            content_type,
            self._cdn_url(channel_id, attachment_id, filename, expires),
            description,
            ephemeral,
            width,
            height,
            time.monotonic() + self.cdn_ttl if self.cdn_ttl is not None else None,
        )
        self.attachments[attachment_id] = attachment
        return attachment

    def upload_attachment(
        self, channel: Channel | int, filename: str, data: bytes, *, content_type: str | None = None
    ) -> Attachment:
        """A user's upload for an attachment option; ``.payload()`` is its ``resolved.attachments`` entry."""
        return self._new_attachment(_id(channel), filename, data, content_type=content_type, ephemeral=True)

    def expire_attachment(self, attachment: Attachment | int) -> None:
        """Make the CDN answer 404 for this attachment from now on."""
        self.attachments[_id(attachment)].expired = True

    # ------------------------------------------------------------------------------------------ users acting

    def _member_or_user(self, user: Any, channel: Channel) -> tuple[User, Member | None]:
        user_obj = self.users[_id(user)]
        if channel.guild_id is None:
            return user_obj, None
        member = self.guilds[channel.guild_id].members.get(user_obj.id)
        if member is None:
            raise ValueError(f"{user_obj.username} is not a member of guild {channel.guild_id}")
        return user_obj, member

    def _new_interaction(
        self,
        type_: int,
        user: Any,
        channel: Channel | int,
        data: dict,
        *,
        message: Message | None = None,
        attachment_size_limit: int | None = None,
    ) -> Interaction:
        channel = self.channels[_id(channel)]
        user_obj, member = self._member_or_user(user, channel)
        interaction_id = self._snowflake()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48)
        guild = self.guilds.get(channel.guild_id) if channel.guild_id else None
        limit = attachment_size_limit or (guild.attachment_size_limit if guild else 10 * MIB)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": type_,
            "token": token,
            "version": 1,
            "channel_id": str(channel.id),
            "channel": channel.payload(),
            "app_permissions": str(self.permissions_in(channel, self.bot_user)),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": limit,
            "data": data,
        }
        if guild is not None:
            payload |= {
                "guild_id": str(guild.id),
                "guild": {"id": str(guild.id), "locale": "en-US", "features": []},
                "guild_locale": "en-US",
                "member": member.payload(self.permissions_in(channel, user_obj)),
                "authorizing_integration_owners": {"0": str(guild.id)},
                "context": 0,
            }
        else:
            payload |= {"user": user_obj.payload(), "authorizing_integration_owners": {"0": "0"}, "context": 1}
        if message is not None:
            payload["message"] = self._message_payload(message)
        interaction = Interaction(
            interaction_id,
            token,
            type_,
            user_obj,
            channel.id,
            guild.id if guild else None,
            data,
            payload,
            limit,
            message.id if message else None,
            _messages=self._messages,
        )
        self.interactions[interaction_id] = self._by_token[token] = interaction

        def sent() -> None:
            if interaction.dispatched_at is None:
                interaction.dispatched_at = time.monotonic()

        self._dispatch("INTERACTION_CREATE", payload, on_sent=sent)
        return interaction

    def _find_command(self, channel: Channel, name: str, type_: int = 1) -> dict:
        scopes = ([channel.guild_id] if channel.guild_id else []) + [None]
        for scope in scopes:
            for command in self._commands.get(scope, []):
                if command["name"] == name and command.get("type", 1) == type_:
                    return command
        synced = {scope: [c["name"] for c in cmds] for scope, cmds in self._commands.items()}
        raise LookupError(f"no synced command /{name} usable in channel {channel.id}; synced: {synced}")

    def _check_invocable(self, command: dict, channel: Channel, user: User) -> None:
        contexts = command.get("contexts")
        context = 0 if channel.guild_id else 1
        if contexts is not None and context not in contexts:
            raise ValueError(f"/{command['name']} cannot be used in context {context} (contexts={contexts})")
        required = command.get("default_member_permissions")
        if channel.guild_id and required is not None:
            perms = self.permissions_in(channel, user)
            if int(required) == 0 and not perms & Permission.ADMINISTRATOR:
                raise PermissionError(f"/{command['name']} is for administrators only")
            if perms & int(required) != int(required):
                raise PermissionError(f"{user.username} lacks default_member_permissions of /{command['name']}")

    def _option_value(self, channel: Channel, spec: dict, value: Any, resolved: dict) -> Any:
        kind = spec["type"]
        if kind == 11:
            if isinstance(value, tuple):
                value = self.upload_attachment(channel, value[0], value[1])
            elif isinstance(value, bytes | bytearray):
                value = self.upload_attachment(channel, f"{spec['name']}.png", bytes(value))
            if not isinstance(value, Attachment):
                raise TypeError(f"option {spec['name']!r} wants an Attachment, (filename, bytes) or bytes")
            resolved.setdefault("attachments", {})[str(value.id)] = value.payload()
            return str(value.id)
        if kind in (6, 9) and (isinstance(value, User | Member) or _id(value) in self.users):
            user = self.users[_id(value)]
            resolved.setdefault("users", {})[str(user.id)] = user.payload()
            member = self.guilds[channel.guild_id].members.get(user.id) if channel.guild_id else None
            if member is not None:
                data = member.payload(self.permissions_in(channel, user))
                del data["user"]
                resolved.setdefault("members", {})[str(user.id)] = data
            return str(user.id)
        if kind in (8, 9):
            role = self.roles[_id(value)]
            resolved.setdefault("roles", {})[str(role.id)] = role.payload()
            return str(role.id)
        if kind == 7:
            target = self.channels[_id(value)]
            perms = str(self.permissions_in(target, self.bot_user))
            resolved.setdefault("channels", {})[str(target.id)] = target.payload() | {"permissions": perms}
            return str(target.id)
        return {3: str, 4: int, 5: bool, 10: float}[kind](value)

    def _build_options(
        self,
        channel: Channel,
        specs: list[dict],
        values: dict[str, Any],
        resolved: dict,
        *,
        focused: str | None = None,
    ) -> list[dict]:
        by_name = {spec["name"]: spec for spec in specs}
        options = []
        for name, value in values.items():
            if name not in by_name:
                raise ValueError(f"unknown option {name!r}; the command has {sorted(by_name)}")
            spec = by_name[name]
            if focused is not None:
                option = {"name": name, "type": spec["type"], "value": str(value)}
                if name == focused:
                    option["focused"] = True
            else:
                option = {
                    "name": name,
                    "type": spec["type"],
                    "value": self._option_value(channel, spec, value, resolved),
                }
            options.append(option)
        if focused is None:
            missing = [s["name"] for s in specs if s.get("required") and s["name"] not in values]
            if missing:
                raise ValueError(f"required options missing: {missing}")
        return options

    def _command_data(
        self,
        channel: Channel,
        user: User,
        name: str,
        options: dict[str, Any],
        *,
        focused: str | None = None,
    ) -> dict:
        words = name.split()
        command = self._find_command(channel, words[0])
        self._check_invocable(command, channel, user)
        data: dict[str, Any] = {"id": str(command["id"]), "name": command["name"], "type": 1}
        if command.get("guild_id"):
            data["guild_id"] = command["guild_id"]
        resolved: dict[str, Any] = {}
        specs, target = command.get("options", []), data
        for word in words[1:]:
            sub = next((s for s in specs if s["name"] == word and s["type"] in (1, 2)), None)
            if sub is None:
                raise ValueError(f"/{name}: no sub-command {word!r}")
            node: dict[str, Any] = {"name": word, "type": sub["type"], "options": []}
            target.setdefault("options", []).append(node)
            specs, target = sub.get("options", []), node
        target["options"] = self._build_options(channel, specs, options, resolved, focused=focused)
        if resolved:
            data["resolved"] = resolved
        return data

    def send_slash(
        self,
        user: Any,
        channel: Channel | int,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        attachments: dict[str, Any] | None = None,
        attachment_size_limit: int | None = None,
    ) -> Interaction:
        """``user`` runs ``/name`` (``"group sub"`` for sub-commands) in ``channel``; returns the interaction.

        ``options`` maps option names to values (``User``/``Member``/``Role``/``Channel``/``Attachment`` for
        the snowflake types); ``attachments`` maps attachment options to ``(filename, bytes)``, bytes or an
        ``Attachment`` from ``upload_attachment``. The command must have been synced, be usable here and the
        user must have its ``default_member_permissions`` (else ``LookupError``/``ValueError``/``PermissionError``).
        """
        channel = self.channels[_id(channel)]
        user_obj, _ = self._member_or_user(user, channel)
        values = dict(options or {}) | dict(attachments or {})
        data = self._command_data(channel, user_obj, name, values)
        return self._new_interaction(
            APPLICATION_COMMAND, user_obj, channel, data, attachment_size_limit=attachment_size_limit
        )

    def send_autocomplete(
        self, user: Any, channel: Channel | int, name: str, options: dict[str, str], focused: str
    ) -> Interaction:
        """``user`` is typing option ``focused`` of ``/name``; the bot's choices land in ``Interaction.choices``."""
        channel = self.channels[_id(channel)]
        user_obj, _ = self._member_or_user(user, channel)
        if focused not in options:
            options = dict(options) | {focused: ""}
        data = self._command_data(channel, user_obj, name, options, focused=focused)
        return self._new_interaction(AUTOCOMPLETE, user_obj, channel, data)

    def _component(self, user: Any, message: Message | int, custom_id: str) -> tuple[Message, dict]:
        msg = self._messages.get(_id(message))
        if msg is None or msg.deleted:
            raise LookupError(f"no message {_id(message)}")
        if msg.ephemeral and msg.interaction_id and self.interactions[msg.interaction_id].user.id != _id(user):
            raise ValueError("only the interaction's user sees this ephemeral message")
        for component in _walk_components(msg.components):
            if component.get("custom_id") == custom_id:
                if component.get("disabled"):
                    raise ValueError(f"component {custom_id!r} is disabled")
                return msg, component
        raise LookupError(f"message {msg.id} has no component {custom_id!r}; it has {msg.custom_ids}")

    def click(self, user: Any, message: Message | int, custom_id: str) -> Interaction:
        """``user`` clicks the button ``custom_id`` on ``message`` (type 3 with the message)."""
        msg, component = self._component(user, message, custom_id)
        data = {"custom_id": custom_id, "component_type": component["type"]}
        return self._new_interaction(MESSAGE_COMPONENT, user, msg.channel_id, data, message=msg)

    def select(self, user: Any, message: Message | int, custom_id: str, values: list[str]) -> Interaction:
        """``user`` picks ``values`` in the string select ``custom_id`` on ``message``."""
        msg, component = self._component(user, message, custom_id)
        data = {"custom_id": custom_id, "component_type": component["type"], "values": list(values)}
        return self._new_interaction(MESSAGE_COMPONENT, user, msg.channel_id, data, message=msg)

    def post_message(self, user: Any, channel: Channel | int, content: str) -> Message:
        """``user`` writes ``content`` in ``channel`` (MESSAGE_CREATE; ``<@id>`` mentions are parsed)."""
        channel = self.channels[_id(channel)]
        user_obj, _ = self._member_or_user(user, channel)
        msg = Message(self._snowflake(), channel.id, channel.guild_id, user_obj, content)
        msg.mentions = [self.users[int(i)] for i in re.findall(r"<@!?(\d+)>", content) if int(i) in self.users]
        self._store_message(msg)
        return msg

    @staticmethod
    def _emoji_key(emoji: Any) -> str:
        if isinstance(emoji, str):
            return emoji.removeprefix("<").removesuffix(">").removeprefix("a:").removeprefix(":")
        return f"{emoji.name}:{emoji.id}" if getattr(emoji, "id", None) else str(emoji.name)

    @staticmethod
    def _emoji_payload(key: str) -> dict:
        if ":" in key:
            name, emoji_id = key.rsplit(":", 1)
            return {"id": emoji_id, "name": name, "animated": False}
        return {"id": None, "name": key}

    def react(self, user: Any, message: Message | int, emoji: str) -> None:
        """``user`` adds ``emoji`` to ``message`` (MESSAGE_REACTION_ADD), as a person clicking a reaction."""
        msg = self._messages[_id(message)]
        self._add_reaction(self.users[_id(user)], msg, self._emoji_key(emoji))

    def unreact(self, user: Any, message: Message | int, emoji: str) -> None:
        """``user`` removes their ``emoji`` from ``message`` (MESSAGE_REACTION_REMOVE)."""
        msg = self._messages[_id(message)]
        self._remove_reaction(self.users[_id(user)].id, msg, self._emoji_key(emoji))

    def _add_reaction(self, user: User, msg: Message, key: str) -> bool:
        users = msg.reactions.setdefault(key, [])
        if user.id in users:
            return False
        users.append(user.id)
        data: dict[str, Any] = {
            "user_id": str(user.id),
            "channel_id": str(msg.channel_id),
            "message_id": str(msg.id),
            "emoji": self._emoji_payload(key),
            "burst": False,
            "burst_colors": [],
            "type": 0,
            "message_author_id": str(msg.author.id),
        }
        if msg.guild_id:
            data["guild_id"] = str(msg.guild_id)
            member = self.guilds[msg.guild_id].members.get(user.id)
            if member is not None:
                data["member"] = member.payload()
        intent = Intent.GUILD_MESSAGE_REACTIONS if msg.guild_id else Intent.DIRECT_MESSAGE_REACTIONS
        self._dispatch("MESSAGE_REACTION_ADD", data, intent=intent)
        return True

    def _remove_reaction(self, user_id: int, msg: Message, key: str) -> bool:
        users = msg.reactions.get(key, [])
        if user_id not in users:
            return False
        users.remove(user_id)
        if not users:
            del msg.reactions[key]
        data: dict[str, Any] = {
            "user_id": str(user_id),
            "channel_id": str(msg.channel_id),
            "message_id": str(msg.id),
            "emoji": self._emoji_payload(key),
            "burst": False,
            "type": 0,
        }
        if msg.guild_id:
            data["guild_id"] = str(msg.guild_id)
        intent = Intent.GUILD_MESSAGE_REACTIONS if msg.guild_id else Intent.DIRECT_MESSAGE_REACTIONS
        self._dispatch("MESSAGE_REACTION_REMOVE", data, intent=intent)
        return True

    # --------------------------------------------------------------------------------------- inspecting state

    def interaction(self, interaction_id: Any) -> Interaction:
        """The interaction with this id."""
        return self.interactions[_id(interaction_id)]

    def expire_token(self, interaction: Interaction | int) -> None:
        """End this interaction's 15 minutes now: its webhook routes answer 401 50027."""
        self.interactions[_id(interaction)].token_expired = True

    def message(self, message_id: Any) -> Message:
        """The message with this id (deleted ones too, with ``deleted=True``)."""
        return self._messages[_id(message_id)]

    def messages_in(self, channel: Channel | int, *, ephemeral: bool = False) -> list[Message]:
        """The channel's messages, oldest first; ephemeral ones only with ``ephemeral=True``."""
        channel = self.channels[_id(channel)]
        messages = (self._messages[i] for i in channel.message_ids)
        return [m for m in messages if not m.deleted and (ephemeral or not m.ephemeral)]

    def commands(self, guild: Guild | int | None = None) -> list[dict]:
        """The commands synced for ``guild`` (``None``: global), as Discord stores them."""
        return list(self._commands.get(None if guild is None else _id(guild), []))

    def sync_count(self, guild: Guild | int | None = None) -> int:
        """How many bulk overwrites (``PUT …/commands``) ``guild`` (``None``: global) received."""
        scope = None if guild is None else _id(guild)
        return sum(1 for s, _ in self.syncs if s == scope)

    @property
    def invalid_requests(self) -> int:
        """Answers that count towards Discord's 10,000-per-10-minutes ban: 401, 403 and 429."""
        return sum(1 for r in self.requests if r.status in (401, 403, 429))

    def mark(self) -> int:
        """A position in ``requests``, for ``wait_for(..., since=mark)``."""
        return len(self.requests)

    async def wait_for(self, what: Callable[[], Any] | tuple[str, str], timeout: float = 5.0, *, since: int = 0) -> Any:
        """Wait until ``what`` holds and return its value.

        ``what`` is a predicate (``lambda: inter.acked``) or ``(method, path_regex)``, which returns the first
        finished ``Request`` at index ``since`` or later whose path matches (``re.search``).
        """
        if isinstance(what, tuple):
            method, pattern = what[0].upper(), re.compile(what[1])

            def predicate() -> Any:
                return next(
                    (r for r in self.requests[since:] if r.method == method and pattern.search(r.path)),
                    None,
                )

            label = f"{method} {pattern.pattern}"
        else:
            predicate, label = what, getattr(what, "__name__", repr(what))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._changed
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = "\n  ".join(repr(r) for r in self.requests[-10:])
                raise TimeoutError(f"waited {timeout}s for {label}; last requests:\n  {recent}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 0.05))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------------------------------ rate limits

    def inject_429(
        self,
        route: str,
        retry_after: float = 0.1,
        *,
        global_: bool = False,
        times: int = 1,
        method: str | None = None,
    ) -> _Injection:
        """The next ``times`` requests whose path matches ``route`` get a 429 (``global_``: a global limit)."""
        injection = _Injection(re.compile(route), method.upper() if method else None, retry_after, global_, times)
        self._injections.append(injection)
        return injection

    def add_bucket(self, route: str, limit: int, per: float, *, method: str | None = None) -> None:
        """A real per-route bucket: ``limit`` requests per ``per`` seconds per major parameter, with headers."""
        bucket_hash = hashlib.sha1(f"{route}{method}".encode()).hexdigest()[:16]
        self._buckets.append(_Bucket(re.compile(route), method.upper() if method else None, limit, per, bucket_hash))

    def _rate_limit(self, method: str, path: str, bot_route: bool) -> dict[str, str]:
        now = time.monotonic()
        if bot_route and now < self._global_block_until:
            raise self._too_many(self._global_block_until - now, True)
        for injection in self._injections:
            if injection.hits >= injection.times or not injection.pattern.search(path):
                continue
            if injection.method and injection.method != method:
                continue
            injection.hits += 1
            if injection.global_:
                self._global_block_until = now + injection.retry_after
            raise self._too_many(injection.retry_after, injection.global_)
        headers: dict[str, str] = {}
        for bucket in self._buckets:
            if not bucket.pattern.search(path) or (bucket.method and bucket.method != method):
                continue
            major = re.search(r"/(?:channels|guilds)/\d+|/(?:webhooks|interactions)/\d+/[^/]+", path)
            key = major.group(0) if major else ""
            reset_at, used = bucket.windows.get(key, (0.0, 0))
            if now >= reset_at:
                reset_at, used = now + bucket.per, 0
            reset_after = reset_at - now
            headers = {
                "X-RateLimit-Limit": str(bucket.limit),
                "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
                "X-RateLimit-Reset-After": f"{reset_after:.3f}",
                "X-RateLimit-Bucket": bucket.hash,
            }
            if used >= bucket.limit:
                raise self._too_many(reset_after, False, headers | {"X-RateLimit-Remaining": "0"})
            bucket.windows[key] = (reset_at, used + 1)
            headers["X-RateLimit-Remaining"] = str(bucket.limit - used - 1)
            break
        return headers

    @staticmethod
    def _too_many(retry_after: float, global_: bool, headers: dict[str, str] | None = None) -> DiscordError:
        headers = dict(headers or {})
        headers |= {"Retry-After": str(max(1, int(retry_after + 0.999))), "X-RateLimit-Scope": "user"}
        if global_:
            headers |= {"X-RateLimit-Global": "true", "X-RateLimit-Scope": "global"}
        body = {"message": "You are being rate limited.", "retry_after": round(retry_after, 3), "global": global_}
        if global_:
            body["code"] = 0
        return DiscordError(429, 0, "You are being rate limited.", headers=headers, body=body)

    # -------------------------------------------------------------------------------------------- the gateway

    def _dispatch(
        self,
        event: str,
        data: dict,
        *,
        intent: int | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        session = self._session
        if session is None or not session.valid:
            if event in _USER_EVENTS:  # what people did while the bot had no session is lost, as on Discord
                self.undelivered.append((event, data))
            return
        if intent is not None and not session.intents & intent:
            return
        session.seq += 1
        frame = json.dumps({"op": 0, "t": event, "s": session.seq, "d": data})
        session.backlog.append((session.seq, frame, on_sent))
        self.events.append(GatewayEvent(event, session.seq, data))
        if session.conn is not None and not session.conn.closed:
            session.conn.send(frame, on_sent)
        self._notify()

    async def drop_gateway(self, code: int = 4000, *, resumable: bool = True) -> None:
        """Close the bot's websocket with ``code``; with ``resumable=False`` its RESUME gets op 9 (re-IDENTIFY).

        Events dispatched while it is away are replayed on RESUME, as Discord does.
        """
        session = self._session
        if session is not None and not resumable:
            session.valid = False
        conn = session.conn if session is not None else None
        if conn is None:
            conn = next((c for c in self._conns if not c.closed), None)
        if conn is None:
            return
        conn.closed = conn.dropped = True
        await conn.ws.close(code=code, message=b"closed by the emulator")
        self._notify()

    def request_reconnect(self) -> None:
        """Send op 7 RECONNECT: the client closes and RESUMEs."""
        session = self._session
        if session is not None and session.conn is not None:
            session.conn.send({"op": 7, "d": None})

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=16 * MIB)
        await ws.prepare(request)
        conn = _Connection(ws)
        self._conns.add(conn)
        self.connections += 1
        conn.writer = asyncio.create_task(self._write(conn))
        conn.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        frame = json.loads(msg.data)
                    except ValueError:
                        await ws.close(code=4002, message=b"Error while decoding payload.")
                        break
                    await self._on_frame(conn, frame)
                elif msg.type == WSMsgType.BINARY:
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                    break
        finally:
            conn.closed = True
            self._conns.discard(conn)
            if conn.writer is not None:
                conn.writer.cancel()
            session = conn.session
            if session is not None and session.conn is conn:
                session.conn = None
                if ws.close_code in (1000, 1001) and not conn.dropped:
                    session.valid = False  # a clean close by the client ends the session
            self._notify()
        return ws

    async def _write(self, conn: _Connection) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                frame, on_sent = await conn.queue.get()
                await conn.ws.send_str(frame)
                if on_sent is not None:
                    on_sent()

    async def _on_frame(self, conn: _Connection, frame: dict) -> None:
        op, data = frame.get("op"), frame.get("d")
        if op == 1:
            conn.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            await self._identify(conn, data or {})
        elif op == 6:
            await self._resume(conn, data or {})
        elif op in (3, 4, 8, 31):
            if conn.session is None:
                await conn.ws.close(code=4003, message=b"Not authenticated.")
        else:
            await conn.ws.close(code=4001, message=b"Unknown opcode.")

    def _token_ok(self, token: Any) -> bool:
        return isinstance(token, str) and token.removeprefix("Bot ") == self.token

    async def _identify(self, conn: _Connection, data: dict) -> None:
        if conn.session is not None:
            await conn.ws.close(code=4005, message=b"Already authenticated.")
            return
        if not self._token_ok(data.get("token")):
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0:
            await conn.ws.close(code=4013, message=b"Invalid intent(s).")
            return
        if intents & PRIVILEGED_INTENTS & ~self.privileged_intents:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        if self._session is not None:
            self._session.valid = False
        session = _Session(secrets.token_hex(16), intents, data.get("shard"))
        session.conn, conn.session = conn, session
        self._session = session
        self.identifies += 1
        self.identify_payloads.append(data)
        guilds = [g for g in self.guilds.values() if self.bot_user.id in g.members]
        ready: dict[str, Any] = {
            "v": 10,
            "user": self.bot_user.payload() | {"verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "user_settings": {},
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["local"],
        }
        if session.shard is not None:
            ready["shard"] = session.shard
        self._dispatch("READY", ready)
        for guild in guilds:
            self._dispatch("GUILD_CREATE", self._guild_create_payload(guild))

    async def _resume(self, conn: _Connection, data: dict) -> None:
        session = self._session
        if not self._token_ok(data.get("token")):
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        seq = data.get("seq") or 0
        oldest = session.backlog[0][0] if session and session.backlog else 1
        if session is None or not session.valid or data.get("session_id") != session.id or seq < oldest - 1:
            conn.send({"op": 9, "d": False, "s": None, "t": None})
            return
        if session.conn is not None and session.conn is not conn:
            session.conn.closed = True
        session.conn, conn.session = conn, session
        for number, frame, on_sent in list(session.backlog):
            if number > seq:
                conn.send(frame, on_sent)
                self.replayed += 1
        self.resumes += 1
        self._dispatch("RESUMED", {})

    def _guild_create_payload(self, guild: Guild) -> dict:
        session = self._session
        with_members = session is not None and session.intents & Intent.GUILD_MEMBERS
        members = [m for uid, m in guild.members.items() if with_members or uid == self.bot_user.id]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id),
            "unavailable": False,
            "member_count": len(guild.members),
            "large": False,
            "joined_at": _iso(guild.members[self.bot_user.id].joined_at),
            "premium_tier": guild.premium_tier,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "afk_timeout": 300,
            "afk_channel_id": None,
            "system_channel_id": None,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "vanity_url_code": None,
            "application_id": None,
            "roles": [r.payload() for r in guild.roles.values()],
            "channels": [c.payload() for c in guild.channels.values()],
            "members": [m.payload() for m in members],
            "emojis": [],
            "stickers": [],
            "features": [],
            "threads": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    # ---------------------------------------------------------------------------------------------- messages

    def _message_payload(self, msg: Message, *, for_bot_dispatch: bool = False) -> dict:
        data: dict[str, Any] = {
            "id": str(msg.id),
            "type": msg.type,
            "channel_id": str(msg.channel_id),
            "author": msg.author.payload(),
            "content": msg.content,
            "timestamp": _iso(msg.created_at),
            "edited_timestamp": _iso(msg.edited_at),
            "tts": msg.tts,
            "mention_everyone": False,
            "mentions": [u.payload() for u in msg.mentions],
            "mention_roles": [],
            "attachments": [a.payload() for a in msg.attachments],
            "embeds": msg.embeds,
            "pinned": False,
            "flags": msg.flags,
            "components": msg.components,
        }
        if msg.guild_id:
            data["guild_id"] = str(msg.guild_id)
        if msg.nonce is not None:
            data["nonce"] = msg.nonce
        if msg.webhook_id:
            data["webhook_id"] = str(msg.webhook_id)
        if msg.application_id:
            data["application_id"] = str(msg.application_id)
        if msg.interaction_metadata:
            data["interaction_metadata"] = msg.interaction_metadata
        if msg.message_reference:
            data["message_reference"] = msg.message_reference
            ref = self._messages.get(int(msg.message_reference.get("message_id", 0) or 0))
            if ref is not None:
                data["referenced_message"] = None if ref.deleted else self._message_payload(ref)
        if msg.reactions:
            data["reactions"] = [
                {
                    "emoji": self._emoji_payload(key),
                    "count": len(users),
                    "count_details": {"burst": 0, "normal": len(users)},
                    "me": self.bot_user.id in users,
                    "me_burst": False,
                    "burst_colors": [],
                }
                for key, users in msg.reactions.items()
            ]
        if for_bot_dispatch and self._content_hidden(msg):
            data |= {"content": "", "embeds": [], "attachments": [], "components": []}
        return data

    def _content_hidden(self, msg: Message) -> bool:
        session = self._session
        if session is None or session.intents & Intent.MESSAGE_CONTENT:
            return False
        mentioned = any(u.id == self.bot_user.id for u in msg.mentions)
        return msg.guild_id is not None and msg.author.id != self.bot_user.id and not mentioned

    def _store_message(self, msg: Message) -> None:
        self._messages[msg.id] = msg
        self.channels[msg.channel_id].message_ids.append(msg.id)
        if not msg.ephemeral:
            intent = Intent.GUILD_MESSAGES if msg.guild_id else Intent.DIRECT_MESSAGES
            self._dispatch("MESSAGE_CREATE", self._message_payload(msg, for_bot_dispatch=True), intent=intent)

    def _updated(self, msg: Message) -> None:
        if not msg.ephemeral:
            intent = Intent.GUILD_MESSAGES if msg.guild_id else Intent.DIRECT_MESSAGES
            self._dispatch("MESSAGE_UPDATE", self._message_payload(msg, for_bot_dispatch=True), intent=intent)

    def _deleted(self, msg: Message) -> None:
        msg.deleted = True
        if not msg.ephemeral:
            data = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
            if msg.guild_id:
                data["guild_id"] = str(msg.guild_id)
            intent = Intent.GUILD_MESSAGES if msg.guild_id else Intent.DIRECT_MESSAGES
            self._dispatch("MESSAGE_DELETE", data, intent=intent)

    @staticmethod
    def _validate_components(components: Any, flags: int, errors: dict) -> None:
        if not isinstance(components, list):
            _add_error(errors, ("components",), "MODEL_TYPE_CONVERT", "Only iterables may be used in a ListType.")
            return
        if not flags & IS_COMPONENTS_V2:
            if len(components) > 5:
                _add_error(errors, ("components",), "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
            for i, row in enumerate(components):
                children = row.get("components") if isinstance(row, dict) else None
                if not isinstance(row, dict) or row.get("type") != 1 or not isinstance(children, list):
                    _add_error(errors, ("components", i), "UNION_TYPE_CHOICES", "Value must be an action row.")
                    continue
                if not 1 <= len(children) <= 5:
                    _add_error(
                        errors,
                        ("components", i, "components"),
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 5 in length.",
                    )
                if any(c.get("type") in _SELECT_TYPES for c in children) and len(children) > 1:
                    _add_error(
                        errors,
                        ("components", i, "components"),
                        "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                        "The specified component exceeds the maximum width",
                    )
                for j, child in enumerate(children):
                    path = ("components", i, "components", j)
                    kind = child.get("type")
                    if kind == 2:
                        if child.get("style") == 5:
                            if not child.get("url") or "custom_id" in child:
                                _add_error(
                                    errors,
                                    path,
                                    "BUTTON_COMPONENT_URL_REQUIRED",
                                    "A link button needs a url and no custom_id.",
                                )
                        elif child.get("style") != 6 and "custom_id" not in child:
                            _add_error(errors, (*path, "custom_id"), "BASE_TYPE_REQUIRED", "This field is required")
                        if len(str(child.get("label") or "")) > 80:
                            _add_error(
                                errors, (*path, "label"), "BASE_TYPE_MAX_LENGTH", "Must be 80 or fewer in length."
                            )
                    elif kind == 3:
                        if not 1 <= len(child.get("options") or []) <= 25:
                            _add_error(
                                errors,
                                (*path, "options"),
                                "BASE_TYPE_BAD_LENGTH",
                                "Must be between 1 and 25 in length.",
                            )
                    elif kind not in _SELECT_TYPES:
                        _add_error(
                            errors, (*path, "type"), "UNION_TYPE_CHOICES", "Not a component allowed in an action row."
                        )
        seen: set[str] = set()
        for component in _walk_components(components):
            if "custom_id" not in component:
                continue
            custom_id = component["custom_id"]
            if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 100:
                _add_error(
                    errors,
                    ("components",),
                    "BASE_TYPE_BAD_LENGTH",
                    f"custom_id {custom_id!r}: must be between 1 and 100 in length.",
                )
            elif custom_id in seen:
                _add_error(
                    errors,
                    ("components",),
                    "COMPONENT_CUSTOM_ID_DUPLICATED",
                    f"Component custom id cannot be duplicated: {custom_id}",
                )
            seen.add(custom_id)

    @staticmethod
    def _number_components(components: list) -> list:
        components = json.loads(json.dumps(components))
        counter = itertools.count(1)
        for component in _walk_components(components):
            component.setdefault("id", next(counter))
        return components

    def _apply_body(
        self,
        msg: Message,
        body: dict,
        files: list[UploadedFile],
        limit: int,
        *,
        creating: bool,
        interaction: bool = False,
    ) -> None:
        """Validate ``body`` + ``files`` against Discord's rules and apply them to ``msg`` (all or nothing)."""
        for upload in files:
            if len(upload.data) > limit:
                raise DiscordError(413, 40005, "Request entity too large")
        if not isinstance(body, dict):
            raise DiscordError(400, 50109, "The request body contains invalid JSON.")
        errors: dict = {}
        content = msg.content
        if "content" in body:
            content = body["content"] if body["content"] is not None else ""
            if not isinstance(content, str):
                _add_error(errors, ("content",), "BASE_TYPE_STRING", "Must be a string.")
                content = str(content)
            elif len(content) > MAX_CONTENT:
                _add_error(errors, ("content",), "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length.")
        embeds = msg.embeds
        if "embeds" in body:
            embeds = body["embeds"] or []
            if len(embeds) > MAX_EMBEDS:
                _add_error(errors, ("embeds",), "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")
            total = 0
            for i, embed in enumerate(embeds):
                title, description = str(embed.get("title") or ""), str(embed.get("description") or "")
                if len(title) > 256:
                    _add_error(
                        errors, ("embeds", i, "title"), "BASE_TYPE_MAX_LENGTH", "Must be 256 or fewer in length."
                    )
                if len(description) > 4096:
                    _add_error(
                        errors, ("embeds", i, "description"), "BASE_TYPE_MAX_LENGTH", "Must be 4096 or fewer in length."
                    )
                if len(embed.get("fields") or []) > 25:
                    _add_error(
                        errors, ("embeds", i, "fields"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."
                    )
                total += (
                    len(title)
                    + len(description)
                    + sum(len(str(f.get("name", ""))) + len(str(f.get("value", ""))) for f in embed.get("fields") or [])
                )
            if total > 6000:
                _add_error(errors, ("embeds",), "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
        flags = msg.flags
        if "flags" in body and body["flags"] is not None:
            requested = int(body["flags"])
            if creating:
                allowed = (
                    SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2 | (EPHEMERAL if interaction else 0)
                )
                flags = (flags & ~allowed) | (requested & allowed)
            else:
                flags = (flags & ~(SUPPRESS_EMBEDS | IS_COMPONENTS_V2)) | (
                    requested & (SUPPRESS_EMBEDS | IS_COMPONENTS_V2)
                )
        components = msg.components
        if "components" in body:
            components = body["components"] if body["components"] is not None else []
            self._validate_components(components, flags, errors)
        uploads = {}
        for upload in files:
            match = re.fullmatch(r"files\[(\d+)\]|file(\d*)", upload.field)
            index = int(next(g for g in match.groups() if g is not None) or 0) if match else len(uploads)
            uploads[index] = upload
        attachments = list(msg.attachments)
        new_attachments: list[tuple[UploadedFile, dict]] = []
        if "attachments" in body and body["attachments"] is not None:
            existing = {str(a.id): a for a in msg.attachments}
            attachments, used = [], set()
            for i, entry in enumerate(body["attachments"]):
                ref = str(entry.get("id")) if isinstance(entry, dict) else ""
                if ref in existing:
                    attachments.append(existing[ref])
                elif ref.isdigit() and int(ref) in uploads:
                    new_attachments.append((uploads[int(ref)], entry))
                    used.add(int(ref))
                else:
                    _add_error(errors, ("attachments", i, "id"), "ATTACHMENT_NOT_FOUND", f"Unknown attachment {ref!r}.")
            new_attachments += [(u, {}) for index, u in sorted(uploads.items()) if index not in used]
        else:
            attachments = [] if creating else attachments
            new_attachments = [(u, {}) for _, u in sorted(uploads.items())]
        if len(attachments) + len(new_attachments) > MAX_FILES:
            _add_error(errors, ("attachments",), "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_FILES} or fewer in length.")
        nonce = body.get("nonce") if creating else msg.nonce
        if nonce is not None and (not isinstance(nonce, str | int) or len(str(nonce)) > 25):
            _add_error(errors, ("nonce",), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        if errors:
            raise _invalid_form(errors)
        has_sticker_or_poll = bool(body.get("sticker_ids")) or bool(body.get("poll"))
        if not (content or embeds or components or attachments or new_attachments or has_sticker_or_poll):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        if not creating and not msg.loading:  # filling a thinking placeholder is not an edit
            msg.history.append(msg.version())
            msg.edited_at = _now()
        msg.content, msg.embeds, msg.flags, msg.nonce = content, embeds, flags & ~LOADING, nonce
        msg.components = self._number_components(components)
        msg.attachments = attachments + [
            self._new_attachment(
                msg.channel_id,
                str(entry.get("filename") or upload.filename),
                upload.data,
                description=entry.get("description"),
            )
            for upload, entry in new_attachments
        ]
        if creating:
            msg.tts = bool(body.get("tts"))
            if body.get("message_reference"):
                msg.message_reference = dict(body["message_reference"])
            mentioned = re.findall(r"<@!?(\d+)>", content)
            msg.mentions = [self.users[int(i)] for i in mentioned if int(i) in self.users]

    # --------------------------------------------------------------------------------------------------- HTTP

    def _build_routes(self) -> list[tuple[str, re.Pattern, Callable, str]]:
        snow, tok = r"(?P<{}>\d+)", r"(?P<token>[^/]+)"
        table = [
            ("GET", "/users/@me", self._get_me, "bot"),
            ("GET", "/users/{user}", self._get_user, "bot"),
            ("POST", "/users/@me/channels", self._create_dm, "bot"),
            ("GET", "/oauth2/applications/@me", self._get_application, "bot"),
            ("GET", "/applications/@me", self._get_application, "bot"),
            ("GET", "/gateway", self._get_gateway, "none"),
            ("GET", "/gateway/bot", self._get_gateway_bot, "bot"),
            ("GET", "/applications/{app}/commands", self._get_commands, "bot"),
            ("PUT", "/applications/{app}/commands", self._put_commands, "bot"),
            ("POST", "/applications/{app}/commands", self._post_command, "bot"),
            ("DELETE", "/applications/{app}/commands/{command}", self._delete_command, "bot"),
            ("GET", "/applications/{app}/guilds/{guild}/commands", self._get_commands, "bot"),
            ("PUT", "/applications/{app}/guilds/{guild}/commands", self._put_commands, "bot"),
            ("POST", "/applications/{app}/guilds/{guild}/commands", self._post_command, "bot"),
            ("DELETE", "/applications/{app}/guilds/{guild}/commands/{command}", self._delete_command, "bot"),
            ("GET", "/guilds/{guild}", self._get_guild, "bot"),
            ("GET", "/guilds/{guild}/channels", self._get_guild_channels, "bot"),
            ("GET", "/guilds/{guild}/roles", self._get_guild_roles, "bot"),
            ("GET", "/guilds/{guild}/members/{user}", self._get_member, "bot"),
            ("GET", "/channels/{channel}", self._get_channel, "bot"),
            ("POST", "/channels/{channel}/typing", self._typing, "bot"),
            ("GET", "/channels/{channel}/messages", self._get_messages, "bot"),
            ("POST", "/channels/{channel}/messages", self._post_message, "bot"),
            ("GET", "/channels/{channel}/messages/{message}", self._get_message, "bot"),
            ("PATCH", "/channels/{channel}/messages/{message}", self._patch_message, "bot"),
            ("DELETE", "/channels/{channel}/messages/{message}", self._delete_message, "bot"),
            ("DELETE", "/channels/{channel}/messages/{message}/reactions", self._clear_reactions, "bot"),
            ("GET", "/channels/{channel}/messages/{message}/reactions/{emoji}", self._get_reactions, "bot"),
            ("PUT", "/channels/{channel}/messages/{message}/reactions/{emoji}/@me", self._put_reaction, "bot"),
            (
                "DELETE",
                "/channels/{channel}/messages/{message}/reactions/{emoji}/@me",
                self._delete_own_reaction,
                "bot",
            ),
            (
                "DELETE",
                "/channels/{channel}/messages/{message}/reactions/{emoji}/{user}",
                self._delete_user_reaction,
                "bot",
            ),
            ("POST", "/interactions/{interaction}/{token}/callback", self._callback, "webhook"),
            ("POST", "/webhooks/{app}/{token}", self._followup, "webhook"),
            ("GET", "/webhooks/{app}/{token}/messages/{wmessage}", self._get_webhook_message, "webhook"),
            ("PATCH", "/webhooks/{app}/{token}/messages/{wmessage}", self._patch_webhook_message, "webhook"),
            ("DELETE", "/webhooks/{app}/{token}/messages/{wmessage}", self._delete_webhook_message, "webhook"),
        ]
        routes = []
        for method, template, handler, auth in table:
            pattern = re.escape(template)
            for name in ("user", "app", "command", "guild", "channel", "message", "interaction"):
                pattern = pattern.replace(re.escape("{" + name + "}"), snow.format(name))
            pattern = pattern.replace(re.escape("{token}"), tok)
            pattern = pattern.replace(re.escape("{emoji}"), r"(?P<emoji>[^/]+)")
            pattern = pattern.replace(re.escape("{wmessage}"), r"(?P<wmessage>@original|\d+)")
            routes.append((method, re.compile(pattern + "$"), handler, auth))
        return routes

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        # Exactly ``application/json``: discord.py compares the header verbatim (json_response adds a charset).
        all_headers = {"Content-Type": "application/json", "Via": "1.1 google"} | (headers or {})
        return web.Response(status=status, body=json.dumps(data).encode(), headers=all_headers)

    @staticmethod
    def _no_content(headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=204, headers={"Via": "1.1 google"} | (headers or {}))

    async def _read_body(self, request: web.Request, record: Request) -> None:
        content_type = request.headers.get("Content-Type", "")
        if content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                name = part.name or ""
                data = await part.read()
                if name == "payload_json":
                    try:
                        record.json = json.loads(data)
                    except ValueError:
                        raise DiscordError(400, 50109, "The request body contains invalid JSON.") from None
                else:
                    part_type = part.headers.get("Content-Type", "application/octet-stream")
                    record.files.append(UploadedFile(name, part.filename or name, part_type, bytes(data)))
        elif request.can_read_body:
            raw = await request.read()
            if raw:
                try:
                    record.json = json.loads(raw)
                except ValueError:
                    raise DiscordError(400, 50109, "The request body contains invalid JSON.") from None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/gateway" and request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._gateway(request)
        record = Request(request.method, request.path, dict(request.query), dict(request.headers), time.monotonic())
        unknown = False
        try:
            if request.path.startswith(API_PREFIX + "/"):
                response = await self._rest(request, record)
            elif request.path.startswith("/attachments/") and request.method == "GET":
                response = self._cdn(request)
            else:
                raise _UnknownRoute
        except _UnknownRoute:
            unknown = True
            record.response = {"message": "404: Not Found", "code": 0}
            response = self._json(record.response, 404)
        except DiscordError as error:
            body = error.payload()
            record.code = body.get("code") or None
            response = self._json(body, error.status, error.headers)
            record.response = body
        record.status = response.status
        self.requests.append(record)
        if unknown:
            self.unexpected.append(record)
        self._notify()
        return response

    async def _rest(self, request: web.Request, record: Request) -> web.Response:
        path = request.path[len(API_PREFIX) :]
        for method, pattern, handler, auth in self._routes:
            match = pattern.match(path)
            if match is None or method != request.method:
                continue
            if auth == "bot" and request.headers.get("Authorization") != f"Bot {self.token}":
                raise DiscordError(401, 0, "401: Unauthorized")
            rate_headers = self._rate_limit(request.method, request.path, auth == "bot")
            await self._read_body(request, record)
            result = await handler(request, record, **match.groupdict())
            if isinstance(result, web.Response):
                result.headers.update(rate_headers)
                return result
            record.response = result
            return self._json(result, headers=rate_headers)
        raise _UnknownRoute

    def _cdn(self, request: web.Request) -> web.Response:
        match = re.fullmatch(r"/attachments/(\d+)/(\d+)/([^/]+)", request.path)
        attachment = self.attachments.get(int(match.group(2))) if match else None
        gone = web.Response(status=404, text="This content is no longer available.")
        if (
            attachment is None
            or str(attachment.channel_id) != match.group(1)
            or attachment.filename != unquote(match.group(3))
        ):
            return gone
        signed = hashlib.sha256(self._sign_key + f"{attachment.id}:{request.query.get('ex', '')}".encode()).hexdigest()
        if request.query.get("hm") != signed or attachment.expired:
            return gone
        if attachment.expires_at is not None and time.monotonic() > attachment.expires_at:
            return gone
        return web.Response(body=attachment.data, headers={"Content-Type": attachment.content_type})

    # ------------------------------------------------------------------------------------------ REST: basics

    def _channel(self, channel_id: str) -> Channel:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            raise DiscordError(404, 10003, "Unknown Channel")
        if channel.guild_id is not None and self.bot_user.id not in self.guilds[channel.guild_id].members:
            raise DiscordError(403, 50001, "Missing Access")
        return channel

    def _require(self, channel: Channel, needed: int) -> None:
        if channel.type == 1:
            return
        perms = self.permissions_in(channel, self.bot_user)
        if not perms & Permission.VIEW_CHANNEL:
            raise DiscordError(403, 50001, "Missing Access")
        if perms & needed != needed:
            raise DiscordError(403, 50013, "Missing Permissions")

    def _guild(self, guild_id: str) -> Guild:
        guild = self.guilds.get(int(guild_id))
        if guild is None:
            raise DiscordError(404, 10004, "Unknown Guild")
        if self.bot_user.id not in guild.members:
            raise DiscordError(403, 50001, "Missing Access")
        return guild

    async def _get_me(self, request: web.Request, record: Request) -> dict:
        return self.bot_user.payload() | {"verified": True, "mfa_enabled": False, "flags": 0, "locale": "en-US"}

    async def _get_user(self, request: web.Request, record: Request, user: str) -> dict:
        if int(user) not in self.users:
            raise DiscordError(404, 10013, "Unknown User")
        return self.users[int(user)].payload()

    async def _create_dm(self, request: web.Request, record: Request) -> dict:
        recipient = int((record.json or {}).get("recipient_id", 0))
        if recipient not in self.users:
            raise _invalid_form({"recipient_id": {"_errors": [{"code": "USER_NOT_FOUND", "message": "Unknown user"}]}})
        return self.dm_channel(recipient).payload()

    async def _get_application(self, request: web.Request, record: Request) -> dict:
        return {
            "id": str(self.application_id),
            "name": self.bot_user.username,
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner.payload(),
            "verify_key": "0" * 64,
            "team": None,
            "flags": 0,
            "bot": self.bot_user.payload(),
            "interactions_endpoint_url": None,
            "install_params": None,
            "integration_types_config": {"0": {}},
        }

    async def _get_gateway(self, request: web.Request, record: Request) -> dict:
        return {"url": self.gateway_url}

    async def _get_gateway_bot(self, request: web.Request, record: Request) -> dict:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}

    async def _get_guild(self, request: web.Request, record: Request, guild: str) -> dict:
        g = self._guild(guild)
        payload = self._guild_create_payload(g)
        for key in (
            "channels",
            "members",
            "threads",
            "voice_states",
            "presences",
            "joined_at",
            "large",
            "member_count",
        ):
            payload.pop(key, None)
        return payload

    async def _get_guild_channels(self, request: web.Request, record: Request, guild: str) -> list:
        return [c.payload() for c in self._guild(guild).channels.values()]

    async def _get_guild_roles(self, request: web.Request, record: Request, guild: str) -> list:
        return [r.payload() for r in self._guild(guild).roles.values()]

    async def _get_member(self, request: web.Request, record: Request, guild: str, user: str) -> dict:
        member = self._guild(guild).members.get(int(user))
        if member is None:
            raise DiscordError(404, 10007, "Unknown Member")
        return member.payload()

    async def _get_channel(self, request: web.Request, record: Request, channel: str) -> dict:
        ch = self._channel(channel)
        self._require(ch, 0)
        return ch.payload()

    async def _typing(self, request: web.Request, record: Request, channel: str) -> web.Response:
        self._require(self._channel(channel), Permission.SEND_MESSAGES)
        return self._no_content()

    # ------------------------------------------------------------------------------------ REST: commands

    def _scope(self, app: str, guild: str | None) -> int | None:
        if int(app) != self.application_id:
            raise DiscordError(403, 50001, "Missing Access")
        if guild is None:
            return None
        self._guild(guild)
        return int(guild)

    def _validate_options(self, options: Any, path: tuple, errors: dict, depth: int) -> None:
        if not isinstance(options, list):
            _add_error(errors, path, "MODEL_TYPE_CONVERT", "Only iterables may be used in a ListType.")
            return
        if len(options) > 25:
            _add_error(errors, path, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        kinds = {o.get("type") in (1, 2) for o in options if isinstance(o, dict)}
        if len(kinds) > 1:
            _add_error(
                errors, path, "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID", "Sub-commands and options cannot be mixed."
            )
        seen: set[str] = set()
        optional_seen = False
        for j, option in enumerate(options):
            where = (*path, j)
            kind = option.get("type")
            name = option.get("name")
            if kind not in range(1, 12):
                _add_error(errors, (*where, "type"), "BASE_TYPE_CHOICES", f"Value must be one of {list(range(1, 12))}.")
            if not _valid_command_name(name):
                _add_error(errors, (*where, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
            elif name in seen:
                _add_error(
                    errors,
                    (*where, "name"),
                    "APPLICATION_COMMAND_OPTION_NAME_ALREADY_EXISTS",
                    "Option names must be unique",
                )
            seen.add(str(name))
            description = option.get("description")
            if not isinstance(description, str) or not 1 <= len(description) <= 100:
                _add_error(
                    errors, (*where, "description"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
            if kind in (1, 2):
                if depth >= 2 or (kind == 2 and depth >= 1):
                    _add_error(
                        errors,
                        (*where, "type"),
                        "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
                        "Sub-commands nest too deep.",
                    )
                children = option.get("options", [])
                if kind == 2 and any(c.get("type") != 1 for c in children):
                    _add_error(
                        errors,
                        (*where, "options"),
                        "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
                        "A group holds sub-commands only.",
                    )
                self._validate_options(children, (*where, "options"), errors, depth + 1)
                continue
            if option.get("required"):
                if optional_seen:
                    _add_error(
                        errors,
                        path,
                        "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                        "Required options must be placed before non-required options",
                    )
            else:
                optional_seen = True
            choices = option.get("choices")
            if choices:
                if kind not in (3, 4, 10):
                    _add_error(
                        errors,
                        (*where, "choices"),
                        "APPLICATION_COMMAND_OPTION_CHOICES_INVALID",
                        "Choices are for strings and numbers.",
                    )
                if len(choices) > 25:
                    _add_error(errors, (*where, "choices"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
                if option.get("autocomplete"):
                    _add_error(
                        errors,
                        (*where, "autocomplete"),
                        "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID",
                        "Autocomplete and choices are exclusive.",
                    )
                for k, choice in enumerate(choices):
                    if not 1 <= len(str(choice.get("name", ""))) <= 100:
                        _add_error(
                            errors,
                            (*where, "choices", k, "name"),
                            "BASE_TYPE_BAD_LENGTH",
                            "Must be between 1 and 100 in length.",
                        )
                    if kind == 3 and len(str(choice.get("value", ""))) > 100:
                        _add_error(
                            errors,
                            (*where, "choices", k, "value"),
                            "BASE_TYPE_MAX_LENGTH",
                            "Must be 100 or fewer in length.",
                        )
            for key in ("min_length", "max_length"):
                if key in option and not 0 <= int(option[key]) <= 6000:
                    _add_error(errors, (*where, key), "NUMBER_TYPE_MAX", "int value should be between 0 and 6000.")

    def _validate_command(self, command: Any, index: int | None, errors: dict) -> None:
        path: tuple = () if index is None else (index,)
        if not isinstance(command, dict):
            _add_error(errors, path, "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
            return
        kind = command.get("type", 1)
        if kind not in (1, 2, 3, 4):
            _add_error(errors, (*path, "type"), "BASE_TYPE_CHOICES", "Value must be one of {1, 2, 3, 4}.")
        if not _valid_command_name(command.get("name"), chat_input=kind == 1):
            _add_error(errors, (*path, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        description = command.get("description", "")
        if kind == 1:
            if not isinstance(description, str) or not 1 <= len(description) <= 100:
                _add_error(
                    errors, (*path, "description"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
            self._validate_options(command.get("options", []), (*path, "options"), errors, 0)
        else:
            if description:
                _add_error(
                    errors,
                    (*path, "description"),
                    "APPLICATION_COMMAND_DESCRIPTION_INVALID",
                    "Context menu commands have no description.",
                )
            if command.get("options"):
                _add_error(
                    errors,
                    (*path, "options"),
                    "APPLICATION_COMMAND_OPTIONS_INVALID",
                    "Context menu commands have no options.",
                )

    def _stored_command(self, scope: int | None, command: dict) -> dict:
        kind = command.get("type", 1)
        key = (scope, kind, command["name"])
        if key not in self._command_ids:
            self._command_ids[key] = self._snowflake()
        stored = json.loads(json.dumps(command)) | {
            "id": str(self._command_ids[key]),
            "application_id": str(self.application_id),
            "version": str(self._snowflake()),
            "type": kind,
            "description": command.get("description", ""),
            "default_member_permissions": command.get("default_member_permissions"),
            "nsfw": bool(command.get("nsfw", False)),
        }
        if scope is not None:
            stored["guild_id"] = str(scope)
        else:
            stored.setdefault("integration_types", [0])
            stored.setdefault("contexts", None)
        return stored

    async def _get_commands(self, request: web.Request, record: Request, app: str, guild: str | None = None) -> list:
        return self._commands.get(self._scope(app, guild), [])

    async def _put_commands(self, request: web.Request, record: Request, app: str, guild: str | None = None) -> list:
        scope = self._scope(app, guild)
        commands = record.json
        if not isinstance(commands, list):
            raise _invalid_form({"_errors": [{"code": "MODEL_TYPE_CONVERT", "message": "Expected a list."}]})
        errors: dict = {}
        if len(commands) > 100:
            _add_error(errors, (), "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        for i, command in enumerate(commands):
            self._validate_command(command, i, errors)
        names = [(c.get("type", 1), c.get("name")) for c in commands if isinstance(c, dict)]
        if len(set(names)) != len(names):
            _add_error(errors, (), "APPLICATION_COMMANDS_DUPLICATE_NAME", "Application command names must be unique")
        if errors:
            raise _invalid_form(errors)
        self._commands[scope] = [self._stored_command(scope, c) for c in commands]
        self.syncs.append((scope, self._commands[scope]))
        return self._commands[scope]

    async def _post_command(self, request: web.Request, record: Request, app: str, guild: str | None = None) -> dict:
        scope = self._scope(app, guild)
        errors: dict = {}
        self._validate_command(record.json, None, errors)
        if errors:
            raise _invalid_form(errors)
        stored = self._stored_command(scope, record.json)
        current = [c for c in self._commands.get(scope, []) if c["id"] != stored["id"]]
        self._commands[scope] = [*current, stored]
        return stored

    async def _delete_command(
        self, request: web.Request, record: Request, app: str, command: str, guild: str | None = None
    ) -> web.Response:
        scope = self._scope(app, guild)
        current = self._commands.get(scope, [])
        if not any(c["id"] == command for c in current):
            raise DiscordError(404, 10063, "Unknown application command")
        self._commands[scope] = [c for c in current if c["id"] != command]
        return self._no_content()

    # ------------------------------------------------------------------------------ REST: channel messages

    def _bot_message(self, channel: Channel, message: str) -> Message:
        msg = self._messages.get(int(message))
        if msg is None or msg.deleted or msg.channel_id != channel.id or msg.ephemeral:
            raise DiscordError(404, 10008, "Unknown Message")
        return msg

    async def _get_messages(self, request: web.Request, record: Request, channel: str) -> list:
        ch = self._channel(channel)
        self._require(ch, Permission.READ_MESSAGE_HISTORY)
        limit = max(1, min(100, int(request.query.get("limit", 50))))
        messages = [m for m in self.messages_in(ch)]
        if "before" in request.query:
            messages = [m for m in messages if m.id < int(request.query["before"])]
        if "after" in request.query:
            messages = [m for m in messages if m.id > int(request.query["after"])][:limit]
        messages = sorted(messages, key=lambda m: m.id, reverse=True)[:limit]
        return [self._message_payload(m, for_bot_dispatch=True) for m in messages]

    async def _get_message(self, request: web.Request, record: Request, channel: str, message: str) -> dict:
        ch = self._channel(channel)
        self._require(ch, Permission.READ_MESSAGE_HISTORY)
        return self._message_payload(self._bot_message(ch, message), for_bot_dispatch=True)

    async def _post_message(self, request: web.Request, record: Request, channel: str) -> dict:
        ch = self._channel(channel)
        body = record.json if record.json is not None else {}
        needed = Permission.SEND_MESSAGES | (Permission.ATTACH_FILES if record.files else 0)
        self._require(ch, needed)
        nonce = body.get("nonce") if isinstance(body, dict) else None
        if nonce is not None and body.get("enforce_nonce"):
            key = (self.bot_user.id, str(nonce))
            earlier = self._messages.get(self._nonces.get(key, 0))
            if earlier is not None and time.monotonic() - earlier.created_mono <= self.nonce_window:
                return self._message_payload(earlier)
        msg = Message(self._snowflake(), ch.id, ch.guild_id, self.bot_user)
        guild = self.guilds.get(ch.guild_id) if ch.guild_id else None
        self._apply_body(msg, body, record.files, guild.attachment_size_limit if guild else 10 * MIB, creating=True)
        ref = msg.message_reference
        if ref and ref.get("fail_if_not_exists", True):
            target = self._messages.get(int(ref.get("message_id") or 0))
            if target is None or target.deleted:
                raise _invalid_form(
                    {
                        "message_reference": {
                            "_errors": [{"code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "message": "Unknown message"}]
                        }
                    }
                )
        if nonce is not None:
            self._nonces[(self.bot_user.id, str(nonce))] = msg.id
        self._store_message(msg)
        return self._message_payload(msg)

    async def _patch_message(self, request: web.Request, record: Request, channel: str, message: str) -> dict:
        ch = self._channel(channel)
        self._require(ch, Permission.ATTACH_FILES if record.files else 0)
        msg = self._bot_message(ch, message)
        if msg.author.id != self.bot_user.id:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        guild = self.guilds.get(ch.guild_id) if ch.guild_id else None
        limit = guild.attachment_size_limit if guild else 10 * MIB
        self._apply_body(msg, record.json if record.json is not None else {}, record.files, limit, creating=False)
        self._updated(msg)
        return self._message_payload(msg)

    async def _delete_message(self, request: web.Request, record: Request, channel: str, message: str) -> web.Response:
        ch = self._channel(channel)
        msg = self._bot_message(ch, message)
        self._require(ch, 0 if msg.author.id == self.bot_user.id else Permission.MANAGE_MESSAGES)
        self._deleted(msg)
        return self._no_content()

    def _reaction_target(self, channel: str, message: str, emoji: str) -> tuple[Channel, Message, str]:
        ch = self._channel(channel)
        msg = self._bot_message(ch, message)
        key = unquote(emoji)
        if ":" in key:
            raise DiscordError(400, 10014, "Unknown Emoji")  # the emulator's guilds have no custom emojis
        if not key or key.isascii():
            raise DiscordError(400, 10014, "Unknown Emoji")
        return ch, msg, key

    async def _put_reaction(
        self, request: web.Request, record: Request, channel: str, message: str, emoji: str
    ) -> web.Response:
        ch, msg, key = self._reaction_target(channel, message, emoji)
        needed = Permission.READ_MESSAGE_HISTORY | (0 if msg.reactions.get(key) else Permission.ADD_REACTIONS)
        self._require(ch, needed)
        if key not in msg.reactions and len(msg.reactions) >= 20:
            raise DiscordError(400, 30010, "Maximum number of reactions reached (20)")
        self._add_reaction(self.bot_user, msg, key)
        return self._no_content()

    async def _delete_own_reaction(
        self, request: web.Request, record: Request, channel: str, message: str, emoji: str
    ) -> web.Response:
        ch, msg, key = self._reaction_target(channel, message, emoji)
        self._require(ch, Permission.READ_MESSAGE_HISTORY)
        self._remove_reaction(self.bot_user.id, msg, key)
        return self._no_content()

    async def _delete_user_reaction(
        self, request: web.Request, record: Request, channel: str, message: str, emoji: str, user: str
    ) -> web.Response:
        ch, msg, key = self._reaction_target(channel, message, emoji)
        self._require(ch, Permission.MANAGE_MESSAGES if int(user) != self.bot_user.id else 0)
        self._remove_reaction(int(user), msg, key)
        return self._no_content()

    async def _clear_reactions(self, request: web.Request, record: Request, channel: str, message: str) -> web.Response:
        ch = self._channel(channel)
        msg = self._bot_message(ch, message)
        self._require(ch, Permission.MANAGE_MESSAGES)
        msg.reactions.clear()
        data = {"channel_id": str(ch.id), "message_id": str(msg.id)}
        if ch.guild_id:
            data["guild_id"] = str(ch.guild_id)
        self._dispatch("MESSAGE_REACTION_REMOVE_ALL", data, intent=Intent.GUILD_MESSAGE_REACTIONS)
        return self._no_content()

    async def _get_reactions(
        self, request: web.Request, record: Request, channel: str, message: str, emoji: str
    ) -> list:
        ch, msg, key = self._reaction_target(channel, message, emoji)
        self._require(ch, Permission.READ_MESSAGE_HISTORY)
        limit = max(1, min(100, int(request.query.get("limit", 25))))
        after = int(request.query.get("after", 0))
        users = sorted(uid for uid in msg.reactions.get(key, []) if uid > after)[:limit]
        return [self.users[uid].payload() for uid in users]

    # ---------------------------------------------------------------------------------- REST: interactions

    def _interaction_message(
        self, inter: Interaction, body: dict, files: list[UploadedFile], *, ephemeral: bool
    ) -> Message:
        command = inter.type == APPLICATION_COMMAND
        msg = Message(
            self._snowflake(),
            inter.channel_id,
            inter.guild_id,
            self.bot_user,
            type=20 if command else 0,
            webhook_id=self.application_id,
            application_id=self.application_id,
            interaction_id=inter.id,
            flags=EPHEMERAL if ephemeral else 0,
        )
        msg.interaction_metadata = {
            "id": str(inter.id),
            "type": inter.type,
            "user": inter.user.payload(),
            "authorizing_integration_owners": inter.payload.get("authorizing_integration_owners", {}),
        }
        if command:
            msg.interaction_metadata["name"] = inter.data.get("name")
        elif inter.message_id:
            msg.interaction_metadata["interacted_message_id"] = str(inter.message_id)
        if body is not None:
            self._apply_body(msg, body, files, inter.attachment_size_limit, creating=True, interaction=True)
        return msg

    async def _callback(self, request: web.Request, record: Request, interaction: str, token: str) -> Any:
        inter = self.interactions.get(int(interaction))
        try:
            if inter is None or inter.token != token:
                raise DiscordError(404, 10062, "Unknown interaction")
            if inter.acked_type is not None:
                raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
            if time.monotonic() - inter.created_at > self.ack_deadline:
                raise DiscordError(404, 10062, "Unknown interaction")
            return self._acknowledge(inter, request, record)
        except DiscordError as error:
            if inter is not None:
                inter.rejections.append((error.status, error.code))
            raise

    def _acknowledge(self, inter: Interaction, request: web.Request, record: Request) -> Any:
        body = record.json if isinstance(record.json, dict) else {}
        kind = body.get("type")
        data = body.get("data") or {}
        if kind not in _ALLOWED_CALLBACKS.get(inter.type, set()):
            message = f"Interaction response type {kind} is invalid for interaction type {inter.type}."
            raise _invalid_form(
                {"type": {"_errors": [{"code": "INTERACTION_RESPONSE_TYPE_INVALID", "message": message}]}}
            )
        resource: dict[str, Any] | None = {"type": kind}
        msg: Message | None = None
        if kind == 4:
            msg = self._interaction_message(inter, data, record.files, ephemeral=bool(data.get("flags", 0) & EPHEMERAL))
            self._store_message(msg)
            inter.original_message_id = msg.id
        elif kind == 5:
            msg = self._interaction_message(inter, None, [], ephemeral=bool(data.get("flags", 0) & EPHEMERAL))
            msg.flags |= LOADING
            self._store_message(msg)
            inter.original_message_id = msg.id
        elif kind in (6, 7):
            if inter.message_id is None:
                raise _invalid_form(
                    {
                        "type": {
                            "_errors": [
                                {"code": "INTERACTION_RESPONSE_TYPE_INVALID", "message": "No message to update."}
                            ]
                        }
                    }
                )
            inter.original_message_id = inter.message_id
            if kind == 7:
                msg = self._messages[inter.message_id]
                self._apply_body(msg, data, record.files, inter.attachment_size_limit, creating=False)
                self._updated(msg)
            else:
                resource = None
        elif kind == 8:
            choices = data.get("choices") or []
            errors: dict = {}
            if len(choices) > 25:
                _add_error(errors, ("data", "choices"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
            for i, choice in enumerate(choices):
                if not 1 <= len(str(choice.get("name", ""))) <= 100:
                    _add_error(
                        errors,
                        ("data", "choices", i, "name"),
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.",
                    )
            if errors:
                raise _invalid_form(errors)
            inter.choices = choices
        elif kind == 9:
            inter.modal = data
        inter.acked_type = kind
        inter.acked_at = time.monotonic()
        if request.query.get("with_response") not in ("1", "true", "True"):
            return self._no_content()
        answer: dict[str, Any] = {"interaction": {"id": str(inter.id), "type": inter.type}}
        if msg is not None:
            answer["interaction"] |= {
                "response_message_id": str(msg.id),
                "response_message_loading": msg.loading,
                "response_message_ephemeral": msg.ephemeral,
            }
            resource = {"type": kind, "message": self._message_payload(msg)}
        if resource is not None:
            answer["resource"] = resource
        return answer

    def _webhook_interaction(self, app: str, token: str) -> Interaction:
        inter = self._by_token.get(token)
        if int(app) != self.application_id or inter is None:
            raise DiscordError(404, 10015, "Unknown Webhook")
        age = time.monotonic() - inter.created_at
        try:
            if inter.token_expired or age > self.token_ttl:
                raise DiscordError(401, 50027, "Invalid Webhook Token")
            if inter.acked_type is None:
                if age > self.ack_deadline:
                    raise DiscordError(401, 50027, "Invalid Webhook Token")
                raise DiscordError(404, 10015, "Unknown Webhook")
        except DiscordError as error:
            inter.rejections.append((error.status, error.code))
            raise
        return inter

    def _webhook_target(self, inter: Interaction, wmessage: str) -> Message:
        message_id = inter.original_message_id if wmessage == "@original" else int(wmessage)
        allowed = {inter.original_message_id, *inter.followup_ids}
        msg = self._messages.get(message_id or 0)
        if msg is None or msg.deleted or message_id not in allowed:
            error = DiscordError(404, 10008, "Unknown Message")
            inter.rejections.append((error.status, error.code))
            raise error
        return msg

    async def _followup(self, request: web.Request, record: Request, app: str, token: str) -> Any:
        inter = self._webhook_interaction(app, token)
        body = record.json if record.json is not None else {}
        original = inter.original
        try:
            if inter.acked_type == 5 and original is not None and original.loading and not original.deleted:
                # The first follow-up after a thinking defer replaces the "is thinking…" message.
                self._apply_body(original, body, record.files, inter.attachment_size_limit, creating=False)
                self._updated(original)
                msg = original
            else:
                ephemeral = bool(int(body.get("flags") or 0) & EPHEMERAL) if isinstance(body, dict) else False
                msg = self._interaction_message(inter, body, record.files, ephemeral=ephemeral)
                msg.type = 0
                self._store_message(msg)
                inter.followup_ids.append(msg.id)
        except DiscordError as error:
            inter.rejections.append((error.status, error.code))
            raise
        if request.query.get("wait") in ("1", "true", "True"):
            return self._message_payload(msg)
        return self._no_content()

    async def _get_webhook_message(
        self, request: web.Request, record: Request, app: str, token: str, wmessage: str
    ) -> dict:
        inter = self._webhook_interaction(app, token)
        return self._message_payload(self._webhook_target(inter, wmessage))

    async def _patch_webhook_message(
        self, request: web.Request, record: Request, app: str, token: str, wmessage: str
    ) -> dict:
        inter = self._webhook_interaction(app, token)
        msg = self._webhook_target(inter, wmessage)
        try:
            body = record.json if record.json is not None else {}
            self._apply_body(msg, body, record.files, inter.attachment_size_limit, creating=False)
        except DiscordError as error:
            inter.rejections.append((error.status, error.code))
            raise
        self._updated(msg)
        return self._message_payload(msg)

    async def _delete_webhook_message(
        self, request: web.Request, record: Request, app: str, token: str, wmessage: str
    ) -> web.Response:
        inter = self._webhook_interaction(app, token)
        self._deleted(self._webhook_target(inter, wmessage))
        return self._no_content()


@contextlib.contextmanager
def point_discord_py_at(emulator: DiscordEmulator) -> Iterator[DiscordEmulator]:
    """Patch ``discord.http.Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY`` to the emulator; restore after."""
    import discord.gateway
    import discord.http
    import yarl

    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = emulator.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emulator.gateway_url)
    try:
        yield emulator
    finally:
        discord.http.Route.BASE = base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = gateway
