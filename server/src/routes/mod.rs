//! The HTTP endpoints.
pub mod adapters;
pub mod chat;
pub mod completions;
