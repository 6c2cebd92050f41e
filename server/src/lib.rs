//! The front: an OpenAI-compatible HTTP API over the engine (axum), plus health and metrics.
//! The only crate that knows HTTP and JSON.
//!
//! - [`app::router`]: routes, auth ([`app::Ctx`]), body limits;
//! - [`routes`]: chat and completions handlers;
//! - [`generation`]: OpenAI sampling fields → engine requests, `n` choices, streaming;
//! - [`error::ApiError`]: the single mapping from failures to HTTP status and OpenAI errors;
//! - [`serve`]: `pagoda serve` (load in the background, graceful shutdown).
pub mod app;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod serve;
