//! Device ownership (in progress).
