"""`/docs` renders with no network: Swagger UI's script, style and icon come from the server
(the installed `swagger-ui-bundle` package), never a CDN. Real server, real headless Chromium
with every request to another host aborted."""
from __future__ import annotations

import urllib.parse

from tests.procs import ServerProcess
from tests.test_dashboard import browser  # noqa: F401  (fixture)
from tests.test_dashboard_support import wait_until


def test_api_docs_render_with_the_network_off(browser, tmp_path, output_dir):  # noqa: F811
    with ServerProcess(f"sqlite:///{tmp_path / 'docs.db'}", log_path=tmp_path / "server.log") as server:
        own = urllib.parse.urlsplit(server.url).netloc
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        blocked: list[str] = []
        asked: list[str] = []

        def only_this_server(route):
            url = route.request.url
            asked.append(url)
            if urllib.parse.urlsplit(url).netloc == own or url.startswith("data:"):
                route.continue_()
            else:
                blocked.append(url)
                route.abort("internetdisconnected")

        context.route("**/*", only_this_server)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            page.goto(f"{server.url}/docs")
            # Swagger UI draws one block per operation once it has read /openapi.json.
            wait_until(page, "document.querySelectorAll('.opblock').length >= 8", timeout=30,
                       what="Swagger UI's operations")
            text = page.text_content("#swagger-ui")
            assert "gradwatch" in text and "/api/runs/{run}/whatif" in text
            page.screenshot(path=str(output_dir / "docs-offline.png"))
        finally:
            context.close()
        assert blocked == [], blocked  # nothing asked of another host: no CDN, no favicon
        assert any(url.endswith("/docs-assets/swagger-ui-bundle.js") for url in asked)
        assert not errors, errors
