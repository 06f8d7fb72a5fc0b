//! Shared helpers for the real-guest tests in `tests/tests/`.
