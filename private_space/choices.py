"""The choices a request makes, defined once: adding a backdrop style is one line in CATEGORIES.

Both Spaces carry an identical copy of this file (tests/test_guard.py keeps the copies equal): the public page
offers these choices and refuses any other before a photo is sent, and the private app paints from them.
"""

from __future__ import annotations

# A backdrop style, and the scene the backdrop shows for it.
CATEGORIES = {
    "casual": "a sunlit city street with a café terrace and soft bokeh",
    "formal": "an elegant wood-panelled office with warm studio lighting",
}
# Who is in the picture, and the word the backdrop's prompt uses for them.
GENDERS = {"male": "man", "female": "woman"}


def unknown_choice(category: str, gender: str) -> str | None:
    """The sentence for a category or gender there is no such choice for, or None."""
    for value, choices, what in ((category, CATEGORIES, "category"), (gender, GENDERS, "gender")):
        if value not in choices:
            valid = ", ".join(f"'{choice}'" for choice in choices)
            return f"Unknown {what} '{value}'. Choose one of {valid}."
    return None
