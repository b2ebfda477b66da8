"""The robustness suite reuses the end-to-end harness: the real gateway process on loopback."""

from tests.e2e.conftest import make_gateway  # noqa: F401
