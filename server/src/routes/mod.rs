//! The HTTP endpoints.
pub mod chat;
pub mod completions;
