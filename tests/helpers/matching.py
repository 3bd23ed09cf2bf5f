"""Patterns for pytest.raises(match=...) that name an argument."""
import re


def named(phrase):
    """A pattern that finds `phrase` (an argument's name, or words starting and ending with one) as whole words:
    "x" must not match the x of "expected", nor "u" the u of "must"."""
    return rf"\b{re.escape(phrase)}\b"
