//! Model architectures, one family per file.
pub mod llama;
