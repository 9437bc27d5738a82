"""The "Sign in with Hugging Face" button: a signed-in visitor's fair share is their account's (visitors.py).

`gr.LoginButton` as it is adds a server event besides its click: on each page load it runs a function that turns
its label into "Logout (name)". The guard refuses that event (only `predict_api` can be invoked), so this button
keeps only its click, which runs in the browser. With its label unchanged, the click always goes to Gradio's
`/login/huggingface` route (HF OAuth), which comes back to the page signed in; the label stays "Sign in with
Hugging Face".

Gradio adds the OAuth routes for any page with a `LoginButton`; on a Space they need `hf_oauth: true` in the
README (which sets OAUTH_CLIENT_ID and the rest). Off Spaces, Gradio would mock them with the machine's own Hugging
Face login, which needs a token and the Hub at launch, so the page shows the button only where the Space
provides OAuth (`available()`), and works the same without it.
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr

from guard import GET, Allowed

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
    """`gr.LoginButton(**settings)` without its page-load event, inside a `gr.Blocks` (see the module's docstring).

    (Not a subclass: Gradio writes a .pyi file beside the module of every Component subclass.)
    """
    button = gr.LoginButton(**settings)
    button.load_event_to_attach = None  # Gradio attaches it when the Blocks closes: by then there is none
    return button
