"""What a visitor reads: the status line for each moment of their request, and the sentence for each failure."""

from __future__ import annotations

import logging

import gradio as gr

from relay import FAILED, Queued, RelayError, Restarting, Running, Update, Waking
from visitors import TurnedAway

logger = logging.getLogger("backdrop")


# How `describe` begins each line while the job is not over; any other line ends it (the page polls the wait then).
SENDING = "Sending your photo"
WAKING = "Waking up the GPU"
RESTARTING = "The image service is restarting · your photo is kept"
IN_LINE = "You are "
WORKING = "Working on your photo"
UNDER_WAY = (SENDING, WAKING, RESTARTING, IN_LINE, WORKING)


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def about(seconds: float) -> str:
    """A wait in words: to the tenth of a second below 10 s (a short job is often under one), then coarser, but
    never by more than about 5 % (whole minutes would turn 90 s into "2 min")."""
    if seconds < 9.95:
        return f"about {max(0.1, seconds):.1f} s"
    if seconds < 89.5:
        return f"about {round(seconds)} s"
    if seconds < 595:
        minutes, rest = divmod(round(seconds / 10) * 10, 60)
        return f"about {minutes} min {rest} s" if rest else f"about {minutes} min"
    return f"about {round(seconds / 60)} min"


def describe(update: Update | None, now: float, tail: float = 0.0) -> str:
    """The status line for an update (None: nothing heard yet); a queue estimate counts down from when it arrived,
    and `tail` (the front's own seconds after the backend's result, pacing.Tail) is added to it."""
    if update is None:
        return f"{SENDING}…"
    if isinstance(update, Waking):
        return f"{WAKING}… this can take a minute."
    if isinstance(update, Restarting):  # the job waited or ran on a backend that went away: it is sent again
        left = None if update.back_in is None else update.back_in - (now - update.received)
        back = f"back in {about(left)}" if left is not None and left >= 0.5 else "sent again as soon as it is back"
        return f"{RESTARTING} · {back}"
    if isinstance(update, Queued):
        place = "next in line" if update.rank == 0 else f"{ordinal(update.rank + 1)} in line"
        wait = "" if update.eta is None else f" · {about(update.eta + tail - (now - update.received))}"
        return f"{IN_LINE}{place}{wait}"
    if isinstance(update, Running):
        return f"{WORKING} · {update.desc}" if update.desc else f"{WORKING}…"
    return update.status


def sentence_of(error: Exception) -> str:
    """What the visitor is told for an error: its own sentence, or FAILED (logged by its kind only: a message or
    traceback could carry the backend's address or a server path)."""
    if isinstance(error, gr.Error):
        return error.message
    if isinstance(error, RelayError | TurnedAway):
        return str(error)
    logger.error("The relay failed with %s.", type(error).__name__)
    return FAILED
