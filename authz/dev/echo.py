"""The echo backend: answers every request with 200 JSON describing what it received.

Used behind Envoy in e2e tests and the demo to assert what the backend actually saw. Repeated
headers are reported as a list, in arrival order, so a forged header that a proxy appended
instead of replacing is visible. Speaks HTTP/1.1 with keep-alive.

Must not import: the production packages (``authz.identity``, ``authz.server``, ...).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from authz.dev.idp._http import BackgroundHTTPServer, JSONHandler

__all__ = ["EchoServer"]


class _EchoHandler(JSONHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo"

    def _echo(self) -> None:
        headers: dict[str, Any] = {}
        for name, value in self.headers.items():
            key = name.lower()
            if key not in headers:
                headers[key] = value
            elif isinstance(headers[key], list):
                headers[key].append(value)
            else:
                headers[key] = [headers[key], value]
        body = self.read_body()
        doc = {
            "method": self.command,
            "path": self.path,
            "query": urlsplit(self.path).query,
            "headers": headers,
            "body": body.decode("utf-8", errors="replace"),
        }
        self.send_json(200, doc)

    def __getattr__(self, name: str) -> Any:
        # Every method (GET, POST, PATCH, PROPFIND, ...) is answered the same way.
        if name.startswith("do_"):
            return self._echo
        raise AttributeError(name)


class EchoServer:
    """``EchoServer(host, port).start()``; ``.url`` is ``http://host:port``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._http = BackgroundHTTPServer(host, port, _EchoHandler)

    def start(self) -> Self:
        self._http.start(name="echo")
        return self

    def stop(self) -> None:
        self._http.stop()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def host(self) -> str:
        return self._http.host

    @property
    def url(self) -> str:
        host = self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
