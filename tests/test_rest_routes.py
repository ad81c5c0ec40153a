"""Every route of SPEC sections 1-3 is registered with the method the 2023 clients use."""

from __future__ import annotations

from collections.abc import Callable

from lollms_fast.app import build_app
from lollms_fast.config import Config

SPEC_ROUTES = {
    "GET": ["/list_bindings", "/list_models", "/list_personalities_languages",
            "/list_personalities_categories", "/list_personalities", "/list_languages",
            "/list_discussions", "/get_config", "/get_current_personality",
            "/get_all_personalities", "/get_personality", "/disk_usage",
            "/get_generation_status", "/extensions", "/training", "/main", "/settings",
            "/help", "/", "/new_discussion", "/update_message", "/message_rank_up",
            "/message_rank_down", "/delete_message", "/export", "/export_discussion",
            "/stop_gen", "/set_personality_language", "/set_personality_category"],
    "POST": ["/load_discussion", "/delete_discussion", "/rename", "/edit_title",
             "/export_multiple_discussions", "/import_multiple_discussions",
             "/update_setting", "/save_settings", "/apply_settings", "/set_binding",
             "/set_model", "/update_model_params"],
}


def test_every_spec_route_is_registered(make_config: Callable[..., Config]) -> None:
    app = build_app(make_config(), backend_factory=None)
    registered = {(r.method, r.resource.canonical) for r in app.router.routes()
                  if r.resource is not None}
    missing = [(m, p) for m, paths in SPEC_ROUTES.items() for p in paths
               if (m, p) not in registered]
    assert missing == []
