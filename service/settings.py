"""Service settings, read from `TUNEFORGE_*` environment variables (or passed in by tests).

Never instantiated at import time: `create_app(settings)` and the CLI build one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_HOME = Path(".tuneforge")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    environment: Literal["local", "production"] = "local"
    database_url: str = "sqlite:///./tuneforge.db"
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("data").resolve()],
        description="Folders that dataset and model paths must resolve inside (comma-separated in the env).",
    )
    home: Path = Field(DEFAULT_HOME, description="Local state: the first admin token, the tokenisation cache.")
    artifact_dir: Path = Field(DEFAULT_HOME / "artifacts", description="Uploaded checkpoints and exported models.")
    lease_timeout_s: float = Field(60.0, gt=1.0, le=3600.0)
    reaper_interval_s: float = Field(5.0, gt=0.0, le=600.0)
    max_body_bytes: int = Field(1_000_000, ge=1_000, description="Largest JSON request body accepted.")
    max_checkpoint_bytes: int = Field(20_000_000_000, ge=1_000)
    db_pool_size: int = Field(10, ge=1, le=200)
    db_max_overflow: int = Field(20, ge=0, le=500)
    auth_disabled: bool = Field(False, description="Local experiments only; refused in production.")

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                # pydantic-settings' usual list syntax, which users reach for first
                try:
                    return json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list of folders ({exc.msg}); or give them comma-separated") from None
            return [part for part in value.split(",") if part.strip()]
        return value

    @field_validator("data_roots", mode="after")
    @classmethod
    def _resolve_roots(cls, value: list[Path]) -> list[Path]:
        # Containment checks compare resolved paths, so the roots are resolved once here.
        return [p.expanduser().resolve() for p in value]

    @field_validator("database_url")
    @classmethod
    def _psycopg3_driver(cls, value: str) -> str:
        # Plain postgresql:// would pick psycopg2, which is not a dependency.
        for prefix in ("postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix):]
        return value

    @model_validator(mode="after")
    def _refuse_insecure(self) -> Settings:
        if self.environment == "production" and self.auth_disabled:
            raise ValueError("TUNEFORGE_AUTH_DISABLED cannot be set when TUNEFORGE_ENVIRONMENT=production")
        return self

    @property
    def admin_token_file(self) -> Path:
        return self.home / "admin-token"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
