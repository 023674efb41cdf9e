//! Plugin logic.
pub mod config;
pub mod pod;
