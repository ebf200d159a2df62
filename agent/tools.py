"""The tools an agent declares and runs for the cloud: reading files under a root, fetching
from allow-listed hosts. Nothing else runs: an undeclared tool or invalid arguments are refused.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from agent.config import FileReadConfig, HttpGetConfig, ToolsConfig
from pacore.errors import BadRequestError, NotFoundError, PACoreError, PermissionDeniedError
from pacore.providers._http import translate_transport_error
from pacore.types import ToolDefinition

__all__ = ["FileReadTool", "HttpGetTool", "Tool", "ToolBox"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Tool(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Arguments: ClassVar[type[_Args]]

    def definition(self) -> ToolDefinition:
        return ToolDefinition(
            name=self.name,
            description=self.description,
            parameters=self.Arguments.model_json_schema(),
        )

    @abstractmethod
    async def run(self, args: Any) -> dict[str, Any]:
        """The tool's JSON result; failures raise :class:`PACoreError`."""


class FileReadArgs(_Args):
    path: str = Field(min_length=1, max_length=4096, description="file path relative to the root")


class FileReadTool(Tool):
    name = "file_read"
    description = "Read a text file from the agent's document directory."
    Arguments = FileReadArgs

    def __init__(self, config: FileReadConfig) -> None:
        self.root = config.root.resolve()
        self.max_bytes = config.max_bytes

    def resolve(self, path: str) -> Path:
        """The file ``path`` names, symlinks followed, refused unless it lies under the root."""
        relative = Path(path)
        if relative.is_absolute():
            raise PermissionDeniedError(
                "file_read takes a path relative to its root", code="path_outside_root",
                param="path",
            )
        target = (self.root / relative).resolve()
        if not target.is_relative_to(self.root):
            raise PermissionDeniedError(
                "file_read may only read under its root", code="path_outside_root", param="path"
            )
        if not target.is_file():
            raise NotFoundError(f"no file '{path}' under the root", param="path")
        return target

    async def run(self, args: FileReadArgs) -> dict[str, Any]:
        target = self.resolve(args.path)
        data, size = await asyncio.to_thread(self._read, target)
        return {
            "path": target.relative_to(self.root).as_posix(),
            "content": data[: self.max_bytes].decode("utf-8", errors="replace"),
            "truncated": len(data) > self.max_bytes,
            "size": size,
        }

    def _read(self, target: Path) -> tuple[bytes, int]:
        try:
            with target.open("rb") as f:
                return f.read(self.max_bytes + 1), target.stat().st_size
        except OSError:
            raise PermissionDeniedError("the file cannot be read", param="path") from None


class HttpGetArgs(_Args):
    url: str = Field(min_length=1, max_length=8192, description="http(s) URL on an allowed host")


class HttpGetTool(Tool):
    name = "http_get"
    description = "Fetch a URL with HTTP GET from one of the agent's allowed hosts."
    Arguments = HttpGetArgs

    def __init__(self, config: HttpGetConfig) -> None:
        self.allow = set(config.allow_hosts)
        self.config = config

    def check(self, url: str | httpx.URL) -> httpx.URL:
        """``url`` parsed, refused unless it is http(s) to an allow-listed host."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise BadRequestError("not a valid URL", param="url") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise BadRequestError("http_get fetches http(s) URLs only", param="url")
        host = parsed.host.lower()
        if host not in self.allow and f"{host}:{parsed.port}" not in self.allow:
            raise PermissionDeniedError(
                f"host '{host}' is not on this agent's allow list", code="host_not_allowed",
                param="url",
            )
        return parsed

    async def run(self, args: HttpGetArgs) -> dict[str, Any]:
        url = self.check(args.url)
        timeout = httpx.Timeout(self.config.timeout_s)
        try:
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
                # Redirects are followed by hand so that every hop is checked against the list.
                for _ in range(self.config.max_redirects + 1):
                    async with client.stream("GET", url) as response:
                        if response.is_redirect and "location" in response.headers:
                            url = self.check(url.join(response.headers["location"]))
                            continue
                        return await self._result(url, response)
        except PACoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to the platform's transport errors
            raise translate_transport_error(exc, "http_get") from None
        raise BadRequestError("too many redirects", param="url")

    async def _result(self, url: httpx.URL, response: httpx.Response) -> dict[str, Any]:
        body = bytearray()
        async for piece in response.aiter_bytes():
            body += piece
            if len(body) > self.config.max_bytes:
                break
        return {
            "url": str(url),
            "status": response.status_code,
            "content_type": response.headers.get("content-type"),
            "body": bytes(body[: self.config.max_bytes]).decode(
                response.encoding or "utf-8", errors="replace"
            ),
            "truncated": len(body) > self.config.max_bytes,
        }


class ToolBox:
    """The tools this agent declared, by name."""

    def __init__(self, tools: list[Tool]) -> None:
        self._tools = {t.name: t for t in tools}

    @classmethod
    def from_config(cls, config: ToolsConfig) -> ToolBox:
        tools: list[Tool] = []
        if config.file_read is not None:
            tools.append(FileReadTool(config.file_read))
        if config.http_get is not None:
            tools.append(HttpGetTool(config.http_get))
        return cls(tools)

    def definitions(self) -> list[ToolDefinition]:
        return [t.definition() for t in self._tools.values()]

    async def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        tool = self._tools.get(name)
        if tool is None:
            raise BadRequestError(
                f"tool '{name}' is not declared on this agent", code="unknown_tool", param="name"
            )
        try:
            args = tool.Arguments.model_validate(arguments)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "arguments"
            raise BadRequestError(
                f"invalid arguments for tool '{name}': {where}: {first['msg']}",
                code="invalid_arguments", param="arguments",
            ) from None
        return await tool.run(args)
