"""Every caller is someone: a Python caller's token names their account (the Hub's whoami, on a loopback stand-in),
a visitor signed in on the page is their account (Gradio's own local OAuth mock), and either has the share of an
account; a token the Hub refuses, or a Hub that hangs, leaves an address visitor, never an error."""

from __future__ import annotations

import httpx
import pytest
from conftest import API, EXAMPLE_PHOTO, TLS, TOKEN, front_app, raw_outputs, running, stack, submit, wait_until
from gradio_client import Client
from gradio_client.exceptions import AppError

from accounts import Accounts
from pool import Backends

SHARES = {"max_jobs_per_visitor": 1, "visitor_rate": "", "account_max_jobs": 1, "account_rate": ""}
BUSY = "You already have 1 photo in line. Please wait until one is done."


def caller(url: str, token: str | bool = False) -> Client:
    """A Python caller, with its Hugging Face token (`token=`, as the README shows) or none."""
    return Client(url, token=token, verbose=False, ssl_verify=TLS)


def refusal(job) -> str:
    with pytest.raises(AppError) as refused:
        job.result(timeout=60)
    return str(refused.value)


def in_line(job) -> bool:
    return any(" in line" in output[2] or "Working" in output[2] for output in job.outputs())


def test_two_callers_at_one_address_with_two_tokens_have_two_shares(private_app, public_app, hub, caplog, capfd):
    hub.accounts.update({"hf_ada_5b1f": "ada", "hf_bob_7c2e": "bob"})
    with stack(private_app, public_app, front=SHARES) as s:
        s.standin.hold()
        ada, bob, stranger = submit(caller(s.front, "hf_ada_5b1f")), submit(caller(s.front, "hf_bob_7c2e")), None
        wait_until(lambda: in_line(ada) and in_line(bob), what="both accounts' photos in line")
        stranger = submit(caller(s.front))  # no token: this address's one photo
        wait_until(lambda: in_line(stranger), what="the address's photo in line")
        again = refusal(submit(caller(s.front)))  # the address's share is taken; the accounts' are their own
        twice = refusal(submit(caller(s.front, "hf_ada_5b1f")))
        s.standin.release_all()
        for job in (ada, bob, stranger):
            assert job.result(timeout=60)[2].startswith("Done in ")
    assert again.startswith(BUSY)
    assert again.endswith(
        "call with your Hugging Face token (Client(..., token=...)) for a share of your own (1 photo at once)."
    )
    assert twice == BUSY  # ada's own share: no advice to get one
    assert len(hub.asked) == 2  # one whoami per token, for uploads and runs alike: the answers were kept
    logged = caplog.text + "".join(capfd.readouterr())
    assert "hf_ada_5b1f" not in logged
    assert "hf_bob_7c2e" not in logged


def test_a_token_the_hub_refuses_or_a_hub_that_hangs_leaves_an_address_visitor(private_app, public_app, hub):
    hub.accounts["hf_ada_5b1f"] = "ada"
    with stack(private_app, public_app, front=SHARES) as s:
        slow = Accounts(timeout_s=0.5)  # how long a caller waits for the Hub's answer before counting as an address
        front = front_app(public_app, Backends.connect([s.back], TOKEN), accounts=slow, **SHARES)
        with running(front, public_app.serve) as url:
            s.standin.hold()
            refused = submit(caller(url, "hf_not_a_token"))  # the Hub says 401: an address, not an error
            wait_until(lambda: in_line(refused), what="the refused token's photo in line")
            assert refusal(submit(caller(url))).startswith(BUSY)  # ... this address's one photo
            s.standin.release_all()
            assert refused.result(timeout=60)[2].startswith("Done in ")
            hub.hang()
            s.standin.hold()
            hanging = submit(caller(url, "hf_ada_5b1f"))  # the Hub does not answer: an address, in time
            wait_until(lambda: in_line(hanging), what="the photo of a caller whose account the Hub did not say")
            assert refusal(submit(caller(url))).startswith(BUSY)
            hub.answer()
            s.standin.release_all()
            assert hanging.result(timeout=60)[2].startswith("Done in ")


def test_sign_in_starts_from_the_pins_and_a_signed_in_visitors_share_is_their_accounts(
    private_app, public_app, hub, monkeypatch
):
    """Gradio's own local OAuth mock (no patching): it signs this machine's Hugging Face account in, which it asks
    whoami for while the app is built, with the machine's token."""
    hub.accounts["hf_grace_machine"] = "grace"
    monkeypatch.setenv("HF_TOKEN", "hf_grace_machine")
    with stack(private_app, public_app) as s:
        front = front_app(public_app, Backends.connect([s.back], TOKEN), sign_in=True, **SHARES)
        with running(front, public_app.serve) as url, httpx.Client(base_url=url, verify=TLS) as raw:
            page = raw.get("config").json()
            button = next(c for c in page["components"] if c["props"].get("elem_id") == "sign-in")
            assert button["props"]["value"] == "Sign in with Hugging Face"
            assert raw.get("backdrop/me").json() == {"name": None}
            signed_out = raw.post(
                "gradio_api/upload", files={"files": (EXAMPLE_PHOTO.name, EXAMPLE_PHOTO.read_bytes())}
            )
            assert raw_outputs(raw, signed_out.json()[0])[2].startswith("Done in ")  # the page works signed out
            to_callback = raw.get("login/huggingface", follow_redirects=False)  # the button's click: the mock's login
            signed_in = raw.get(to_callback.headers["location"], follow_redirects=False)  # back, signed in
            cookie = {"cookie": signed_in.headers["set-cookie"].split(";")[0]}  # (Secure: httpx keeps it for https)
            assert raw.get("backdrop/me", headers=cookie).json() == {"name": "grace"}
            s.standin.hold()
            photo = raw.post(
                "gradio_api/upload", headers=cookie, files={"files": ("g.png", EXAMPLE_PHOTO.read_bytes())}
            )
            grace = Client(url, token=False, verbose=False, ssl_verify=TLS, headers=cookie)
            graces = submit_path(grace, photo.json()[0])
            wait_until(lambda: in_line(graces), what="grace's photo in line")
            anonymous = submit(caller(url))  # the address's own share is still free: grace's was her account's
            wait_until(lambda: in_line(anonymous), what="the address's photo in line, beside grace's")
            s.standin.release_all()
            assert graces.result(timeout=60)[2].startswith("Done in ")
            assert anonymous.result(timeout=60)[2].startswith("Done in ")
            assert raw.get("logout", headers=cookie, follow_redirects=False).status_code in (302, 307)


def submit_path(client: Client, path: str):
    """A run on a photo already uploaded (by the same visitor, from the page's session)."""
    photo = {"path": path, "meta": {"_type": "gradio.FileData"}}
    return client.submit(photo, "casual", "male", api_name=API)
