"""Fair share on the public app: who a visitor is (forged headers included), and a flooder cannot crowd others out."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from conftest import API, TOKEN, front_app, running, stack, statuses, submit, visitor, wait_until
from settings_tables import settings_of
from starlette.datastructures import Headers
from starlette.requests import Request

from visitors import Callers, FairShare, Share, TurnedAway, address_of


def request(*forwarded_for: str, peer: str = "10.1.2.3", username: str | None = None, session: dict | None = None):
    """A stand-in for gr.Request: the proxy's socket address, the X-Forwarded-For headers as sent, a user."""
    headers = Headers(raw=[(b"x-forwarded-for", value.encode()) for value in forwarded_for])
    raw = SimpleNamespace(scope={"session": session} if session else {})
    return SimpleNamespace(client=SimpleNamespace(host=peer), headers=headers, username=username, request=raw)


def visitor_of(request, trusted_hops: int) -> str:
    """Who the app names for `request`, with no Hub to ask about tokens (tests/test_accounts.py asks one)."""
    return asyncio.run(Callers(trusted_hops).visitor_of(request))


def test_the_address_is_the_one_the_last_trusted_proxy_appended():
    assert visitor_of(request("198.51.100.7"), 1) == "address 198.51.100.7"
    for forged in ("203.0.113.9, 198.51.100.7", "1.1.1.1, 2.2.2.2, 198.51.100.7", "evil,198.51.100.7"):
        assert visitor_of(request(forged), 1) == "address 198.51.100.7"  # entries the client wrote are ignored
    assert visitor_of(request("203.0.113.9", "198.51.100.7"), 1) == "address 198.51.100.7"  # two header lines
    assert visitor_of(request("203.0.113.9, 198.51.100.7, 10.0.0.2"), 2) == "address 198.51.100.7"
    assert visitor_of(request("203.0.113.9, 198.51.100.7"), 0) == "address 10.1.2.3"  # 0: the socket peer
    assert visitor_of(request(), 1) == "address 10.1.2.3"  # no proxy in front after all: the peer, not nothing
    assert visitor_of(request("198.51.100.7"), 2) == "address 10.1.2.3"
    assert visitor_of(request("198.51.100.8"), 1) != visitor_of(request("198.51.100.7"), 1)
    assert address_of(request("198.51.100.7"), 0) == "address 10.1.2.3"
    assert settings_of("public_space").SETTINGS.default("TRUSTED_PROXY_HOPS") == "0"  # a bare start believes none


def test_an_ipv6_client_is_one_visitor_per_64_and_a_user_is_one_visitor_anywhere():
    a, b = request("2001:db8:1:2::1"), request("2001:DB8:1:2:ffff::9")
    assert visitor_of(a, 1) == visitor_of(b, 1) == "address 2001:db8:1:2::/64"
    assert visitor_of(request("2001:db8:1:3::1"), 1) != visitor_of(a, 1)
    assert visitor_of(request("198.51.100.7", username="ada"), 1) == "user ada"
    oauth = {"oauth_info": {"userinfo": {"preferred_username": "grace"}}}
    assert visitor_of(request("198.51.100.7", session=oauth), 1) == "user grace"


def test_an_upload_request_names_its_visitor_as_the_endpoint_does():
    """The files middleware names an upload's visitor from the bare Starlette request (no gr.Request there)."""
    forwarded = [(b"x-forwarded-for", b"203.0.113.9, 198.51.100.7")]
    scope = {"type": "http", "headers": forwarded, "client": ("10.1.2.3", 5000)}
    assert visitor_of(Request(scope), 1) == visitor_of(request("203.0.113.9, 198.51.100.7"), 1)
    oauth = {"oauth_info": {"userinfo": {"preferred_username": "grace"}}}
    assert visitor_of(Request({**scope, "session": oauth}), 1) == "user grace"


class Visits:
    """Slots a test holds in a FairShare, as the endpoint holds them: `take` admits one and spends a photo."""

    def __init__(self, share: FairShare) -> None:
        self.share, self.held = share, contextlib.ExitStack()

    def take(self, who: str, *, on_page: bool = True) -> str | None:
        """None when admitted (the slot stays held until `release`), else the refusal's sentence."""
        try:
            self.held.enter_context(self.share.slot(who, on_page=on_page))
        except TurnedAway as refusal:
            return str(refusal)
        try:
            self.share.spend(who, on_page=on_page)
        except TurnedAway as refusal:
            self.share.release(who)
            return str(refusal)
        return None


def test_jobs_and_rate_per_visitor_with_sentences_and_no_lasting_state(rate_clock):
    share = FairShare(address=Share(2, "3/2 second"), account=Share(2, "3/2 second"))
    visits = Visits(share)
    assert visits.take("a") is None
    assert visits.take("a") is None
    assert visits.take("a") == "You already have 2 photos in line. Please wait until one is done."
    assert visits.take("b") is None  # another visitor is not touched
    share.release("a")
    assert visits.take("a") is None  # the third of the window
    share.release("a")
    share.release("a")
    refusal = visits.take("a")
    assert refusal is not None
    assert refusal.startswith("You have sent too many photos in the last 2 seconds. Please try again in ")
    share.release("b")
    assert share.jobs == {}  # a visitor without a job leaves nothing behind
    rate_clock.now += 4.2  # the sliding window counts the previous window too
    assert visits.take("a") is None
    share.release("a")
    rate_clock.now += 4.2
    visits.take("c")  # the storage expires old windows when it is next written to (on its own timer thread)
    wait_until(lambda: [key for key in share.limiter.storage.storage if "/a/" in key] == [], what="a's windows gone")


def test_an_account_has_a_share_of_its_own_size(rate_clock):
    share = FairShare(address=Share(1, "2/minute"), account=Share(3, "5/minute"))
    visits = Visits(share)
    assert [visits.take("address 198.51.100.7") for _ in range(2)][1].startswith("You already have 1 photo")
    assert [visits.take("user ada") for _ in range(4)] == [
        None,
        None,
        None,
        "You already have 3 photos in line. Please wait until one is done.",
    ]
    for _ in range(3):
        share.release("user ada")
    assert [visits.take("user ada") for _ in range(2)] == [None, None]  # five in the window: the account's rate
    share.release("user ada")
    share.release("user ada")
    assert visits.take("user ada").startswith("You have sent too many photos in the last minute.")
    assert Share(3, "5/minute").words() == "3 photos at once and 5 a minute"
    assert Share(0, "20/hour").words() == "20 photos an hour"
    assert Share(1, "10/5 minutes").words() == "1 photo at once and 10 every 5 minutes"


def test_a_photo_refused_before_it_is_served_spends_nothing_of_the_rate(rate_clock):
    share = FairShare(address=Share(0, "1/minute"), account=Share(0, ""))
    with share.slot("a", on_page=True):
        pass  # admitted, then refused before it was served (the line too long, say): no spend
    assert Visits(share).take("a") is None
    assert Visits(share).take("a").startswith("You have sent too many photos")


def test_a_refusal_of_an_addresss_share_says_what_an_account_gives_and_how(rate_clock):
    share = FairShare(address=Share(1, "2/minute"), account=Share(1, "2/minute"), sign_in=True)
    own = "for a share of your own (1 photo at once and 2 a minute)."
    for who in ("address 198.51.100.7", "user ada"):
        visits = Visits(share)
        assert visits.take(who) is None
        busy = visits.take(who)
        share.release(who)
        assert visits.take(who) is None
        share.release(who)
        too_many = visits.take(who)
        assert busy.startswith("You already have 1 photo in line.")
        assert too_many.startswith("You have sent too many photos in the last minute.")
        for refusal in (busy, too_many):
            assert refusal.endswith(f"sign in with Hugging Face {own}") is who.startswith("address"), refusal
    api = Visits(share).take("address 198.51.100.7", on_page=False)  # a Python caller: how, with a token
    assert api.endswith(f"call with your Hugging Face token (Client(..., token=...)) {own}")
    plain = Visits(FairShare(address=Share(1, ""), account=Share(1, ""), sign_in=False))  # no button: no advice
    plain.take("address 198.51.100.7")
    assert plain.take("address 198.51.100.7") == "You already have 1 photo in line. Please wait until one is done."


def test_a_flooder_gets_two_places_and_the_next_visitor_is_at_most_third(private_app, public_app):
    fair = {"max_jobs_per_visitor": 2, "visitor_rate": "100/minute", "trusted_proxy_hops": 1}
    with stack(private_app, public_app, front=fair) as s:
        s.standin.hold()  # A's jobs stay in line (one held on the GPU) until C's two have seen their places
        # Visitor A (203.0.113.1) sends 8 at once, each posing as someone else in the part of the header it writes.
        flood = [visitor(s.front, {"X-Forwarded-For": f"192.0.2.{i}, 203.0.113.1"}) for i in range(8)]
        with ThreadPoolExecutor(len(flood)) as pool:
            jobs = list(pool.map(submit, flood))
        wait_until(lambda: sum(job.done() for job in jobs) == 6, what="six of A's eight refused")
        refused = [str(job.exception()) for job in jobs if job.done()]
        # Visitor C, another address, arrives after them with two photos: both go in, behind A's two at most.
        later = [submit(visitor(s.front, {"X-Forwarded-For": "203.0.113.3"})) for _ in range(2)]
        wait_until(lambda: all(any(" in line" in line for line in statuses(job)) for job in later), what="C's places")
        s.standin.release_all()
        for job in later:
            assert job.result(timeout=60)[2].startswith("Done in ")
        accepted = [job for job in jobs if not job.done() or job.exception() is None]
        assert [job.result(timeout=60)[2][:8] for job in accepted] == ["Done in "] * 2
    busy = "You already have 2 photos in line. Please wait until one is done. Everyone at your address shares this"
    assert [line[: len(busy)] for line in refused] == [busy] * 6
    assert all(
        line.endswith(
            "call with your Hugging Face token (Client(..., token=...)) for a share of your own "
            "(2 photos at once and 12 a minute)."
        )
        for line in refused
    ), refused
    places = [line for job in later for line in statuses(job) if " in line" in line]
    assert places
    at_most_third = ("You are next in line", "You are 2nd in line", "You are 3rd in line")
    assert all(line.startswith(at_most_third) for line in places), places


def test_a_cancelled_job_gives_its_slot_back(private_app, public_app):
    fair = {"max_jobs_per_visitor": 1, "visitor_rate": "100/minute", "trusted_proxy_hops": 1}
    with stack(private_app, public_app, front=fair) as s:
        s.standin.hold()  # the blocker stays on the GPU until the end, so the others wait in line
        blocker = submit(visitor(s.front, {"X-Forwarded-For": "203.0.113.1"}))
        s.standin.wait_inside(1)
        same = {"X-Forwarded-For": "203.0.113.2"}
        waiting = submit(visitor(s.front, same))
        wait_until(lambda: any(" in line" in line for line in statuses(waiting)))
        waiting.cancel()
        again = submit(visitor(s.front, same))
        wait_until(lambda: any(" in line" in line for line in statuses(again)), what="the same visitor in line again")
        s.standin.release_all()
        assert again.result(timeout=60)[2].startswith("Done in ")  # not "You already have 1 photo in line"
        assert blocker.result(timeout=60)[2].startswith("Done in ")


def test_the_sign_in_button_is_on_the_page_only_with_oauth_and_runs_nothing_on_the_server(
    public_app, monkeypatch, private_app
):
    import gradio as gr
    import httpx

    from pool import Backends

    assert not any(isinstance(block, gr.LoginButton) for block in front_app(public_app, None).blocks.blocks.values())
    # Off Spaces Gradio would mock the OAuth routes with this machine's Hub login; here only the page is checked.
    monkeypatch.setattr("gradio.routes.attach_oauth", lambda app: None)
    with stack(private_app, public_app) as s:
        front = front_app(public_app, Backends.connect([s.back], TOKEN), sign_in=True, max_jobs_per_visitor=1)
        (button,) = [block for block in front.blocks.blocks.values() if isinstance(block, gr.LoginButton)]
        assert button.value == "Sign in with Hugging Face"
        assert [fn.api_name for fn in front.blocks.fns.values() if fn.fn is not None] == [
            "predict_api"
        ]  # clicks: browser
        with running(front, public_app.serve) as url:
            assert list(httpx.get(f"{url}gradio_api/info").json()["named_endpoints"]) == [API]
            config = httpx.get(f"{url}config").json()
            others = [dep["id"] for dep in config["dependencies"] if dep["api_name"] != "predict_api"]
            assert len(others) >= 3  # Stop, the example, and the sign-in click
            for fn_index in others:
                body = {"data": [], "fn_index": fn_index, "session_hash": "x"}
                assert httpx.post(f"{url}gradio_api/queue/join", json=body).status_code == 403
            assert submit(visitor(url)).result(timeout=30)[2].startswith("Done in ")  # works without signing in


@pytest.mark.browser
def test_the_sign_in_button_goes_to_the_hugging_face_sign_in_and_the_page_loads_with_nothing_refused(
    public_app, monkeypatch
):
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing")
    monkeypatch.setattr("gradio.routes.attach_oauth", lambda app: None)  # Gradio's own routes: not checked here
    refused: list[str] = []
    with running(front_app(public_app, None, sign_in=True), public_app.serve) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("response", lambda r: refused.append(f"{r.url} {r.status}") if r.status in (401, 403) else None)
        page.goto(url)
        page.wait_for_selector("#sign-in")
        assert page.inner_text("#sign-in") == "Sign in with Hugging Face"
        page.wait_for_load_state("networkidle")  # a stock gr.LoginButton's page-load event would be refused here
        page.click("#sign-in")
        page.wait_for_url("**/login/huggingface?_target_url=/**", timeout=10_000)
        browser.close()
    assert refused == []
