"""The jinja2 environment of the reducer's pages (templates/*.html.j2): autoescaping on, an
undefined name is an error, block tags leave no blank lines."""
from __future__ import annotations

from typing import Any

import jinja2


def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("xray.reduce", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    """The page `template` (a file name under templates/) rendered with `context`."""
    return environment().get_template(template).render(**context)
