"""What routes depend on, declared as FastAPI dependencies (so a test can override them)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from decision_platform.serving.platform import Platform


async def get_platform(request: Request) -> Platform:
    """The running platform, built by the app's lifespan (api/app.py). async: a sync dependency would cost
    every request a threadpool hop, even an async route's."""
    return request.app.state.platform


PlatformDep = Annotated[Platform, Depends(get_platform)]
