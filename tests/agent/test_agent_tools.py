"""The agent's tools: reads stay under the root, fetches stay on allow-listed hosts, and nothing
undeclared or malformed runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.config import FileReadConfig, HttpGetConfig, ToolsConfig
from agent.tools import ToolBox
from pacore.errors import BadRequestError, NotFoundError, PermissionDeniedError


class _Handler(BaseHTTPRequestHandler):
    routes = {
        "/hello": (200, {"content-type": "text/plain; charset=utf-8"}, b"hello from the intranet"),
        "/big": (200, {"content-type": "text/plain"}, b"x" * 5000),
        "/hop": (302, {"location": "/hello"}, b""),
        "/escape": (302, {"location": "http://localhost/hello"}, b""),
    }

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b"nope"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    block_on_close = False  # idle keep-alive connections must not hold up the teardown


@pytest.fixture(scope="module")
def intranet() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "readme.txt").write_text("policy: be kind")
    (docs / "sub" / "deep.md").write_text("# deep")
    (docs / "long.txt").write_text("y" * 300)
    (tmp_path / "secret.txt").write_text("do not read")
    (docs / "link-out").symlink_to(tmp_path / "secret.txt")
    (docs / "link-in").symlink_to(docs / "readme.txt")
    return docs


@pytest.fixture
def box(root: Path) -> ToolBox:
    return ToolBox.from_config(ToolsConfig(
        file_read=FileReadConfig(root=root, max_bytes=100),
        http_get=HttpGetConfig(allow_hosts=["127.0.0.1"], max_bytes=1000),
    ))


def test_declared_tools_describe_their_arguments(box: ToolBox) -> None:
    defs = {d.name: d for d in box.definitions()}
    assert set(defs) == {"file_read", "http_get"}
    assert defs["file_read"].parameters["required"] == ["path"]
    assert "url" in defs["http_get"].parameters["properties"]
    assert ToolBox.from_config(ToolsConfig()).definitions() == []


async def test_file_read_reads_under_the_root(box: ToolBox) -> None:
    out = await box.call("file_read", {"path": "readme.txt"})
    assert out == {"path": "readme.txt", "content": "policy: be kind", "truncated": False, "size": 15}
    assert (await box.call("file_read", {"path": "sub/../sub/deep.md"}))["content"] == "# deep"
    assert (await box.call("file_read", {"path": "link-in"}))["path"] == "readme.txt"


async def test_file_read_cuts_long_files(box: ToolBox) -> None:
    out = await box.call("file_read", {"path": "long.txt"})
    assert out["truncated"] is True
    assert len(out["content"]) == 100
    assert out["size"] == 300


@pytest.mark.parametrize("path", ["../secret.txt", "sub/../../secret.txt", "link-out"])
async def test_file_read_refuses_to_leave_the_root(box: ToolBox, path: str) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        await box.call("file_read", {"path": path})
    assert info.value.code == "path_outside_root"
    assert "do not read" not in info.value.message


async def test_file_read_refuses_absolute_paths(box: ToolBox, root: Path) -> None:
    with pytest.raises(PermissionDeniedError):
        await box.call("file_read", {"path": str(root / "readme.txt")})


async def test_file_read_missing_file_is_404(box: ToolBox) -> None:
    with pytest.raises(NotFoundError):
        await box.call("file_read", {"path": "nothing-here.txt"})
    with pytest.raises(NotFoundError):
        await box.call("file_read", {"path": "sub"})  # a directory is not a file


async def test_undeclared_tool_is_refused(root: Path) -> None:
    only_files = ToolBox.from_config(ToolsConfig(file_read=FileReadConfig(root=root)))
    with pytest.raises(BadRequestError) as info:
        await only_files.call("http_get", {"url": "http://127.0.0.1/"})
    assert info.value.code == "unknown_tool"
    with pytest.raises(BadRequestError):
        await only_files.call("shell", {"cmd": "rm -rf /"})


@pytest.mark.parametrize(
    "arguments", [{}, {"path": ""}, {"path": 3}, {"path": "readme.txt", "mode": "w"}]
)
async def test_invalid_arguments_are_refused(box: ToolBox, arguments: dict[str, object]) -> None:
    with pytest.raises(BadRequestError) as info:
        await box.call("file_read", arguments)
    assert info.value.code == "invalid_arguments"


async def test_http_get_fetches_from_an_allowed_host(box: ToolBox, intranet: str) -> None:
    out = await box.call("http_get", {"url": f"{intranet}/hello"})
    assert out["status"] == 200
    assert out["body"] == "hello from the intranet"
    assert out["content_type"].startswith("text/plain")
    assert out["truncated"] is False


async def test_http_get_follows_redirects_on_allowed_hosts_only(
    box: ToolBox, intranet: str
) -> None:
    out = await box.call("http_get", {"url": f"{intranet}/hop"})
    assert (out["status"], out["url"]) == (200, f"{intranet}/hello")
    with pytest.raises(PermissionDeniedError) as info:
        await box.call("http_get", {"url": f"{intranet}/escape"})
    assert info.value.code == "host_not_allowed"


async def test_http_get_cuts_long_bodies(box: ToolBox, intranet: str) -> None:
    out = await box.call("http_get", {"url": f"{intranet}/big"})
    assert out["truncated"] is True
    assert len(out["body"]) == 1000


async def test_http_get_refuses_other_hosts(box: ToolBox, intranet: str) -> None:
    # The same server under another name is still another host.
    port = intranet.rsplit(":", 1)[1]
    for url in (f"http://localhost:{port}/hello", "https://example.com/", "http://10.0.0.1/"):
        with pytest.raises(PermissionDeniedError):
            await box.call("http_get", {"url": url})
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/", "not a url"):
        with pytest.raises(BadRequestError):
            await box.call("http_get", {"url": url})


async def test_http_get_host_and_port_entries(intranet: str) -> None:
    port = intranet.rsplit(":", 1)[1]
    pinned = ToolBox.from_config(ToolsConfig(
        http_get=HttpGetConfig(allow_hosts=[f"127.0.0.1:{port}"])
    ))
    assert (await pinned.call("http_get", {"url": f"{intranet}/hello"}))["status"] == 200
    with pytest.raises(PermissionDeniedError):
        await pinned.call("http_get", {"url": "http://127.0.0.1:1/hello"})
