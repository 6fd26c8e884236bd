"""The one settings object of animabot.

Every knob is read from the environment with the ``ANIMABOT_`` prefix or from a ``.env`` file in the
working directory, and every knob has a default that runs with nothing configured: a SQLite database and
a media folder under ``./animabot-data``. ``.env.example`` documents each one; a test keeps the two in step.

    >>> settings = Settings(data_dir="/srv/animabot")   # explicit values win over the environment
    >>> settings.database_url
    'sqlite:////srv/animabot/animabot.db'
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


def _quality_fields() -> dict[str, Any]:
    """One ``qc_<name>`` setting per quality-gate threshold, defaults from ``worker.quality.Thresholds``."""
    from worker.quality import Thresholds

    return {
        f"qc_{f.name}": (
            type(f.default),
            Field(f.default, description=f"Quality gate: {f.name} (documented on worker.quality.Thresholds)."),
        )
        for f in dataclasses.fields(Thresholds)
    }


#: The quality gate's thresholds as settings (``ANIMABOT_QC_FROZEN_MAD=0.5`` etc.).
_QualitySettings = create_model("_QualitySettings", __base__=BaseSettings, **_quality_fields())


class Settings(_QualitySettings):  # type: ignore[misc,valid-type]
    """Configuration for every process of animabot (CLI, bot, workers)."""

    model_config = SettingsConfigDict(
        env_prefix="ANIMABOT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Storage.
    data_dir: Path = Field(Path("animabot-data"), description="Folder for the SQLite database and media.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite inside data_dir.")
    media_dir: Path | None = Field(None, description="Where artifacts go; empty means data_dir/media.")

    # Generation defaults.
    default_backend: str = Field("local", description="Backend used when the user names none.")
    default_duration: float = Field(5.0, gt=0, description="Clip length in seconds when none is asked.")
    default_motion: int = Field(2, ge=0, le=4, description="Motion strength 0..4 when none is asked.")
    output_fps: int = Field(24, ge=1, le=60, description="Frame rate of delivered clips.")
    output_long_side: int = Field(1280, ge=256, le=3840, description="Long side of delivered clips, px.")
    text_to_image: str = Field(
        "",
        description="What paints the picture of a prompt-only job, BACKEND[:MODEL] (e.g. "
        "replicate:black-forest-labs/flux-schnell); empty picks the first usable backend with a text-to-image "
        "model (replicate, then fal); 'none' turns prompt-only jobs off.",
    )

    max_attempts: int = Field(4, ge=1, le=20, description="Generation attempts per job, all backends together.")
    attempts_per_backend: int = Field(
        3, ge=1, le=10, description="Attempts on one backend before the job falls back to the next on its route."
    )
    best_of: int = Field(
        1, ge=1, le=8, description="Accepted candidates to generate per job; the gate's best one is kept."
    )
    stitch_overlap: float = Field(
        0.5, ge=0.25, le=1.0, description="Cross-fade, in seconds, where an extended clip's segments join."
    )
    interpolation: Literal["motion", "blend", "mci"] = Field(
        "motion",
        description="How clips under 24 fps reach 24: motion (optical flow), blend (fast) or mci (ffmpeg, slow).",
    )
    generation_timeout: float = Field(900.0, gt=0, description="Seconds one attempt may take.")
    retry_backoff: float = Field(1.0, ge=0, description="First wait before retrying a failed attempt, s.")

    # Input validation.
    max_upload_bytes: int = Field(20 * MiB, gt=0, description="Largest source image accepted, bytes.")
    max_image_pixels: int = Field(50_000_000, gt=0, description="Largest pixel count decoded (bomb guard).")
    min_image_side: int = Field(128, ge=16, description="Smallest short side accepted, px.")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="Widest long:short ratio accepted.")
    fit_mode: Literal["crop", "pad"] = Field(
        "crop", description="How a source is fitted to the target aspect: crop it or pad it."
    )

    # Delivery.
    max_clip_bytes: int = Field(10 * MiB, gt=0, description="Byte limit the final encode must fit.")

    # Credits.
    daily_free_credits: int = Field(20, ge=0, description="Credits granted to each member once a day.")
    prices_file: Path | None = Field(None, description="Price table (TOML); empty means the built-in.")

    # Job system.
    redis_url: str = Field(
        "", description="Redis URL: set it (with a PostgreSQL database_url) to run Celery workers; empty runs embedded."
    )
    worker_concurrency: int = Field(2, ge=1, le=64, description="Jobs one worker process works on at once.")
    max_active_per_user: int = Field(3, ge=1, description="Unfinished jobs one member may have at once.")
    max_active_per_guild: int = Field(50, ge=1, description="Unfinished jobs one server may have at once.")
    cooldown_seconds: float = Field(0.0, ge=0, description="Pause a member must leave between two submits, s.")
    lease_seconds: float = Field(
        30.0, ge=2, description="How long a worker holds a job without renewing; a dead worker's jobs return then."
    )
    poll_interval: float = Field(5.0, gt=0, description="Longest wait between two checks of a running generation, s.")
    poll_tick: float = Field(1.0, gt=0, description="How often due generations are checked (beat/embedded), s.")
    reap_interval: float = Field(
        10.0, gt=0, description="How often the reaper looks for stuck, overdue or orphaned jobs (beat/embedded), s."
    )
    job_deadline: float = Field(
        3600.0, gt=0, description="Seconds after submission when a job that is still not done is failed and refunded."
    )
    max_recoveries: int = Field(
        20, ge=1, description="Times a job may be taken back from dead workers before it is failed as poisonous."
    )
    web_host: str = Field("127.0.0.1", description="Address of the web endpoint (webhooks, health).")
    web_port: int = Field(8750, ge=0, le=65535, description="Port of the web endpoint; 0 picks a free one.")
    public_url: str = Field("", description="URL at which providers reach the web endpoint, for webhooks.")
    webhook_secret: str = Field(
        "", description="Secret that signs webhook URLs; empty makes one in data_dir (set it when scaling out)."
    )
    fake_latency: float = Field(0.0, ge=0, description="Seconds each generation of the test-only fake backend takes.")

    # Services.
    discord_token: str = Field("", description="Bot token from the Discord developer portal.")
    discord_dev_guild: str = Field(
        "", description="Server id to sync commands to instantly while developing; empty syncs them globally."
    )
    discord_cdn_hosts: list[str] = Field(
        ["cdn.discordapp.com", "media.discordapp.net"],
        description="Hosts attachments are downloaded from; anything else is refused.",
    )
    status_edit_interval: float = Field(
        2.0, ge=0, description="Least time between two edits of one job's status message, s (rate limits)."
    )
    replicate_api_token: str = Field("", description="Replicate API token (enables the replicate backend).")
    replicate_base_url: str = Field("https://api.replicate.com", description="Replicate's API address.")
    fal_key: str = Field("", description="fal.ai key (enables the fal backend).")
    fal_queue_url: str = Field("https://queue.fal.run", description="fal's queue API address.")
    fal_jwks_url: str = Field(
        "https://rest.alpha.fal.ai/.well-known/jwks.json", description="Where fal publishes its webhook signing keys."
    )
    cog_url: str = Field("", description="A self-hosted Cog model server, e.g. http://gpu-box:5000 (enables cog).")
    provider_download_hosts: list[str] = Field(
        ["replicate.delivery", "*.replicate.delivery", "fal.media", "*.fal.media"],
        description="Hosts generated videos are downloaded from (data: URIs always work); others are refused.",
    )
    max_output_bytes: int = Field(200 * MiB, gt=0, description="Largest generated video downloaded, bytes.")
    webhook_max_bytes: int = Field(
        16 * MiB, gt=0,
        description="Largest webhook body accepted, bytes (a Cog server sends its video in it, base64: "
        "for bigger clips run it with --upload-url).",
    )

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'animabot.db').as_posix()}"
        if self.media_dir is None:
            self.media_dir = self.data_dir / "media"
        return self

    def quality_thresholds(self) -> Any:
        """The quality gate's thresholds (``worker.quality.Thresholds``) from the ``qc_*`` settings."""
        from worker.quality import Thresholds

        return Thresholds(**{f.name: getattr(self, f"qc_{f.name}") for f in dataclasses.fields(Thresholds)})

    def webhook_key(self) -> bytes:
        """``webhook_secret``, or a random one kept in ``data_dir/webhook.secret`` (made on first use)."""
        if self.webhook_secret:
            return self.webhook_secret.encode()
        path = self.data_dir / "webhook.secret"
        if not path.exists():
            import secrets

            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip().encode()

    @property
    def media_path(self) -> Path:
        """The media folder, always set after validation."""
        assert self.media_dir is not None
        return self.media_dir


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def render_env_example() -> str:
    """The text of ``.env.example``: every setting with its description and default.

    Regenerate the file with ``python -m worker.settings > .env.example``.
    """
    lines = [
        "# animabot settings. Every one is optional: with none set, animabot runs offline on SQLite",
        "# with its data under ./animabot-data. Copy this file to .env and uncomment what you change.",
        "",
    ]
    ordered = sorted(Settings.model_fields.items(), key=lambda item: item[0].startswith("qc_"))
    for name, field in ordered:
        default = "" if field.default is None else field.default
        if isinstance(default, Path):
            default = default.as_posix()
        lines += [f"# {field.description}", f"# ANIMABOT_{name.upper()}={default}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_env_example(), end="")
