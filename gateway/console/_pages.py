"""Rendering: Jinja templates of this package, and the headers every console page has.

Every console answer is made here, so every one carries the same protections: a Content
Security Policy that allows only this gateway's own scripts and styles (no inline code,
no other origin, no framing), no caching (pages hold keys and operator data), no
referrer, no MIME sniffing.
"""

from __future__ import annotations

from typing import Any, Literal

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from litestar import MediaType, Response
from litestar.response import Redirect

from gateway.console import _views

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# A round's report is the learner's own page (inline styles, plots as data: images):
# allowed that, sandboxed (no script runs, no form posts), and never framed.
REPORT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}
HTMX_REDIRECT = "hx-redirect"
SEE_OTHER: Literal[303] = 303


def page_headers(csp: str = PAGE_CSP) -> dict[str, str]:
    return {**SECURITY_HEADERS, "content-security-policy": csp}


class Pages:
    """The console's templates, loaded once from the installed package."""

    def __init__(self, base_path: str) -> None:
        self.base_path = base_path
        self._env = Environment(
            loader=PackageLoader("gateway.console", "templates"),
            autoescape=select_autoescape(("html",), default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.globals["base"] = base_path
        self._env.filters.update(
            when=_views.when,
            duration=_views.duration,
            percent=_views.percent,
            number=_views.number,
            plain=_views.plain,
        )

    def render(self, template: str, *, status_code: int = 200, **context: Any) -> Response[str]:
        """``template`` filled in, as an HTML answer with the console's headers."""
        html = self._env.get_template(template).render(**context)
        return Response(
            html, status_code=status_code, media_type=MediaType.HTML, headers=page_headers()
        )

    def redirect(self, to: str, *, htmx: bool = False) -> Response[Any]:
        """Go to ``to`` (a console path): a 303, or for a page's live part (htmx) the
        header that makes htmx load the whole page there."""
        target = self.base_path + to
        if htmx:
            return Response("", status_code=200, headers={**page_headers(), HTMX_REDIRECT: target})
        return Redirect(target, status_code=SEE_OTHER, headers=page_headers())
