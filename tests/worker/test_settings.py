"""Settings: defaults that run with nothing configured, ANIMABOT_ environment, .env files."""

from __future__ import annotations

from pathlib import Path

from worker.settings import Settings, render_env_example

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_run_with_nothing_configured(monkeypatch, tmp_path):
    """With no environment, data goes to ./animabot-data on SQLite."""
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.data_dir == Path("animabot-data")
    assert settings.database_url == "sqlite:///animabot-data/animabot.db"
    assert settings.media_path == Path("animabot-data/media")
    assert settings.default_backend == "local"
    assert settings.max_clip_bytes == 10 * 1024 * 1024


def test_environment_variables_use_the_animabot_prefix(monkeypatch, tmp_path):
    """ANIMABOT_* variables override defaults."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANIMABOT_DATA_DIR", "/srv/anima")
    monkeypatch.setenv("ANIMABOT_MAX_ATTEMPTS", "5")
    settings = Settings()
    assert settings.database_url == "sqlite:////srv/anima/animabot.db"
    assert settings.max_attempts == 5


def test_a_dotenv_file_in_the_working_directory_is_read(monkeypatch, tmp_path):
    """A .env file configures animabot like the environment does."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ANIMABOT_DEFAULT_DURATION=7.5\nANIMABOT_FIT_MODE=pad\n")
    settings = Settings()
    assert settings.default_duration == 7.5
    assert settings.fit_mode == "pad"


def test_env_example_documents_every_setting():
    """.env.example is exactly what render_env_example() produces from the settings themselves."""
    text = (ROOT / ".env.example").read_text()
    assert text == render_env_example(), "regenerate with: python -m worker.settings > .env.example"
    for name, field in Settings.model_fields.items():
        assert f"ANIMABOT_{name.upper()}=" in text
        assert field.description
