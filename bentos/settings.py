"""The service's settings: params.yaml's `serving` section, each overridable by a VITRINE_*
environment variable (tests, ops): VITRINE_MAX_UPLOAD_BYTES, VITRINE_SERVING_THREADS,
VITRINE_CACHE_SIZE, VITRINE_SAMPLE_RATE, VITRINE_AB_MODE, VITRINE_AB_SHARE, VITRINE_VARIANT,
VITRINE_POLL_SECONDS, VITRINE_DEVICE, VITRINE_CUDA_BATCH_SIZE, VITRINE_ADMIN_TOKEN. A bad value
stops the service with one line naming the variable."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from components.config import ServingParams


class SettingsError(ValueError):
    """A VITRINE_* variable the service cannot use."""


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITRINE_", env_ignore_empty=True, extra="ignore")

    max_upload_bytes: int = Field(ge=1024)
    max_pixels: int = Field(ge=1)
    max_batch_size: int = Field(ge=1)
    device: Literal["auto", "cpu", "cuda"]
    cuda_batch_size: int = Field(ge=1)
    serving_threads: int = Field(ge=0)  # 0 = every core
    cache_size: int = Field(ge=0)
    sample_rate: float = Field(ge=0, le=1)
    ab_mode: Literal["off", "route", "shadow"]
    ab_share: float = Field(ge=0, le=1)
    variant: Literal["fp32", "onnx", "int8"]
    poll_seconds: float = Field(ge=0)
    admin_token: str = ""  # empty: POST /admin/reload is disabled

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):
        return (env_settings, init_settings)  # the environment wins over params.yaml

    @classmethod
    def load(cls, serving: ServingParams) -> ServiceSettings:
        try:
            return cls(
                max_upload_bytes=serving.max_upload_bytes,
                max_pixels=serving.max_pixels,
                max_batch_size=serving.max_batch_size,
                device=serving.device,
                cuda_batch_size=serving.cuda_batch_size,
                serving_threads=serving.threads,
                cache_size=serving.cache_size,
                sample_rate=serving.sample_rate,
                ab_mode=serving.ab.mode,
                ab_share=serving.ab.challenger_share,
                variant=serving.variant,
                poll_seconds=serving.poll_seconds,
            )
        except ValidationError as error:
            first = error.errors()[0]
            key = f"VITRINE_{str(first['loc'][0]).upper()}"
            raise SettingsError(f"{key}: {first['msg']} (got {first.get('input')!r})") from None

    def resolved_device(self, cuda_available: bool | None = None):
        """The torch device the models serve from (DeviceError: cuda without one)."""
        from components.model.device import resolve_device

        return resolve_device(self.device, cuda_available, key="serving.device")

    def batch_size(self, device) -> int:
        """The micro-batcher's largest batch: a GPU takes larger ones for the same latency."""
        return self.cuda_batch_size if device.type == "cuda" else self.max_batch_size

    @property
    def threads(self) -> int:
        return self.serving_threads or os.cpu_count() or 1
