"""The playground page at GET /: static files shipped in the package, sent with a policy that lets
the page load and call nothing but this server.

The page talks to `/v1/images/edits` like any client (URLs relative to the page); images it shows
are blob: URLs it makes from the responses.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
# route path -> (package, file inside it, media type)
PAGE_FILES = {
    "/": ("varedit_deploy.serve", "ui/index.html", "text/html; charset=utf-8"),
    "/ui/playground.js": ("varedit_deploy.serve", "ui/playground.js", "text/javascript; charset=utf-8"),
    "/ui/playground.css": ("varedit_deploy.serve", "ui/playground.css", "text/css; charset=utf-8"),
    "/ui/sample.jpg": ("varedit_deploy", "assets/sample.jpg", "image/jpeg"),  # the default photo (the demo's)
}


def page_file(package: str, name: str) -> bytes:
    """A file shipped with the package (read through importlib.resources, as from an installed wheel)."""
    return files(package).joinpath(*name.split("/")).read_bytes()


def page_routes() -> list[Route]:
    """GET routes for the page and what it loads, read once (a few tens of KB)."""
    def static(body: bytes, media_type: str):
        async def endpoint(request: Request) -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)
        return endpoint

    return [Route(path, static(page_file(package, name), media_type), methods=["GET"])
            for path, (package, name, media_type) in PAGE_FILES.items()]
