//! Plugin logic.
