"""What routes depend on, declared as FastAPI dependencies (so a test can override them)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from decision_platform.serving.platform import Platform


def get_platform(request: Request) -> Platform:
    """The running platform, built by the app's lifespan (api/app.py)."""
    return request.app.state.platform


PlatformDep = Annotated[Platform, Depends(get_platform)]
