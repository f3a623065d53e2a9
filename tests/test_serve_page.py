"""The playground page's routes without a browser: what GET / serves, its policy, --no-ui, package data,
and the Ray Serve deployment's route table (with a stand-in for ray.serve where Ray is not installed)."""

from __future__ import annotations

import importlib
import re
import sys
import types

import pytest
from starlette.testclient import TestClient

from varedit_deploy.cli import build_parser
from varedit_deploy.serve.app import create_app
from varedit_deploy.serve.options import ServeOptions
from varedit_deploy.serve.page import CONTENT_SECURITY_POLICY, PAGE_FILES, page_file
from varedit_deploy.serve.state import ServerState


def _client(artifacts, **options) -> TestClient:
    """The app before its pipelines load: the page is static and needs none of them."""
    return TestClient(create_app(ServerState(ServeOptions(str(artifacts), **options))))


def test_every_page_file_ships_as_package_data():
    """Found through importlib.resources, as an installed wheel finds them (pyproject: package-data)."""
    for package, name, _ in PAGE_FILES.values():
        assert len(page_file(package, name)) > 100, (package, name)


def test_page_and_what_it_loads_come_from_this_server_under_a_strict_policy(tiny_artifact):
    client = _client(tiny_artifact)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "'self' blob:"
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline for the policy to refuse
    loaded = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sorted(loaded) == ["ui/playground.css", "ui/playground.js"]  # relative to the page
    expected_types = {"ui/playground.js": "text/javascript", "ui/playground.css": "text/css"}
    for path in loaded:
        r = client.get(f"/{path}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(expected_types[path])
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert r.headers["x-content-type-options"] == "nosniff"
    script = client.get("/ui/playground.js").text
    assert not re.search(r"https?://|//[a-z]", script)  # no other host is ever named
    assert sorted(set(re.findall(r'fetch\("([^"]+)"', script))) == ["ui/sample.jpg", "v1/images/edits", "v1/models"]
    assert "localStorage" not in script and "sessionStorage" not in script and "cookie" not in script
    sample = client.get("/ui/sample.jpg")
    assert sample.status_code == 200 and sample.content.startswith(b"\xff\xd8\xff")
    assert client.post("/").status_code == 405


def test_no_ui_leaves_only_the_api(tiny_artifact):
    client = _client(tiny_artifact, ui=False)
    for path in PAGE_FILES:
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/health").status_code == 200
    assert build_parser().parse_args(["serve", "--artifacts", "a", "--no-ui"]).ui is False
    assert build_parser().parse_args(["serve", "--artifacts", "a"]).ui is None  # None: the option's default


def test_ray_replicas_serve_the_page_and_take_ui_false(tiny_artifact, monkeypatch):
    """The replica builds its ASGI app with create_app, page included; `ui=false` reaches ServeOptions."""
    bound: list[ServeOptions] = []
    fake = types.ModuleType("ray.serve")
    fake.ingress = lambda *args, **kwargs: (lambda cls: cls)
    fake.deployment = lambda cls, **kwargs: types.SimpleNamespace(bind=bound.append)
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    monkeypatch.setitem(sys.modules, "ray.serve", fake)
    monkeypatch.delitem(sys.modules, "varedit_deploy.serve.ray_app", raising=False)
    ray_app = importlib.import_module("varedit_deploy.serve.ray_app")
    try:
        ray_app.app_builder({"artifacts": str(tiny_artifact), "replicas": "1"})
        ray_app.app_builder({"artifacts": str(tiny_artifact), "replicas": "1", "ui": "false"})
        assert [options.ui for options in bound] == [True, False]
        with pytest.raises(ValueError, match="true or false"):
            ray_app.app_builder({"artifacts": str(tiny_artifact), "ui": "no"})
        for options, status in zip(bound, (200, 404)):
            replica = object.__new__(ray_app.VareditReplica)  # its __init__ would load and warm a pipeline
            replica.state = ServerState(options)
            client = TestClient(replica.__serve_build_asgi_app__())
            assert client.get("/").status_code == status
            assert client.get("/health").status_code == 200
    finally:
        sys.modules.pop("varedit_deploy.serve.ray_app", None)  # built against the stand-in
