"""Signing in with Hugging Face: a signed-in visitor's fair share is their account's (visitors.py), and the page
says who they are.

`gr.LoginButton` as it is adds a server event besides its click: on each page load it runs a function that turns
its label into "Logout (name)". Only `predict_api` may run on the server (invariant 2), so this button keeps only
its click, which runs in the browser and goes to Gradio's `/login/huggingface` route, or to `/logout` when its
label is not the sign-in one. What the page shows instead comes from a read-only GET, `ME_ROUTE`, that tells a
page its own session's account name and nothing else; a browser-only load event (`who_js`) reads it, writes
"Signed in as NAME" beside the button and turns the button into "Sign out".

Gradio adds the OAuth routes for any page with a `LoginButton`; on a Space they need `hf_oauth: true` in the
README (which sets OAUTH_CLIENT_ID and the rest). Off Spaces Gradio mocks them with the machine's own Hugging Face
account (whoami with its token, at launch), so the page shows the button only where the Space provides OAuth
(`available()`), and works the same without it.
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from guard import GET, Allowed

SIGN_IN = "Sign in with Hugging Face"  # gr.LoginButton's own label, which its click takes for "not signed in"
SIGN_OUT = "Sign out"
ME_ROUTE = "/backdrop/me"
# Gradio's OAuth routes, which the guard lets through where the page shows the button (app.py's serve()).
SIGN_IN_ROUTES = (
    Allowed(GET, "/login/huggingface", "the button: to the Hub's sign-in"),
    Allowed(GET, "/login/callback", "back from the Hub, signed in"),
    Allowed(GET, "/logout", "signing out"),
)


def available() -> bool:
    """Whether this Space provides HF OAuth (`hf_oauth: true` sets OAUTH_CLIENT_ID), so the button can work."""
    return bool(os.getenv("OAUTH_CLIENT_ID"))


def sign_in_button(**settings: Any) -> gr.LoginButton:
    """`gr.LoginButton(SIGN_IN, **settings)` without its page-load event, inside a `gr.Blocks` (see the module's
    docstring). (Not a subclass: Gradio writes a .pyi file beside the module of every Component subclass.)"""
    button = gr.LoginButton(SIGN_IN, **settings)
    button.load_event_to_attach = None  # Gradio attaches it when the Blocks closes: by then there is none
    return button


def who_js() -> str:
    """Browser-only, at page load: the button's label and the line beside it, from `ME_ROUTE`."""
    return f"""async () => {{
        try {{
            const me = await (await fetch("{ME_ROUTE.lstrip("/")}", {{cache: "no-store"}})).json();
            if (me.name) return [{SIGN_OUT!r}, `Signed in as **${{me.name}}**`];
        }} catch (error) {{}}  // signed out, or the route did not answer: the button as it is
        return [{SIGN_IN!r}, ""];
    }}"""
