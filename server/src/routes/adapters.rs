//! Runtime LoRA adapter admin, compatible with vLLM's endpoints:
//! `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and
//! `POST /v1/unload_lora_adapter {"lora_name"}`. Loading reads files on the blocking pool, never
//! on the engine thread; paths must stay under `--lora-dir`.
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use pagoda_adapters::{confine_path, AdapterRegistry};
use serde::Deserialize;

use crate::app::{parse_json, AdminCtx, Ctx, JsonBody};
use crate::error::ApiError;

#[derive(Deserialize)]
struct LoadRequest {
    lora_name: String,
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadRequest {
    lora_name: String,
}

fn registry(ctx: &Ctx) -> Result<Arc<AdapterRegistry>, ApiError> {
    ctx.engine()?.adapters().cloned().ok_or_else(|| {
        ApiError::bad_request(
            None,
            "LoRA is off: start the server with --lora, --lora-dir or --enable-lora",
        )
    })
}

pub async fn load_lora_adapter(
    AdminCtx(ctx): AdminCtx,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let req: LoadRequest = parse_json(&body)?;
    let registry = registry(&ctx)?;
    let Some(root) = ctx.0.admin.lora_dir.clone() else {
        return Err(ApiError::bad_request(
            Some("lora_path"),
            "loading adapters at run time is off: start the server with --lora-dir DIR",
        ));
    };
    if req.lora_name == ctx.0.served_model_name {
        return Err(ApiError::bad_request(
            Some("lora_name"),
            format!("`{}` is the base model's name", req.lora_name),
        ));
    }
    let name = req.lora_name.clone();
    let info = tokio::task::spawn_blocking(move || {
        let dir = confine_path(&root, &req.lora_path)?;
        registry.load(&req.lora_name, &dir)
    })
    .await
    .map_err(|_| ApiError::unavailable("the adapter loader stopped"))??;
    tracing::info!(name = %name, path = %info.path.display(), rank = info.rank, bytes = info.size_bytes, "LoRA adapter loaded");
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

pub async fn unload_lora_adapter(
    AdminCtx(ctx): AdminCtx,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let req: UnloadRequest = parse_json(&body)?;
    registry(&ctx)?.unload(&req.lora_name)?;
    tracing::info!(name = %req.lora_name, "LoRA adapter unloaded");
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        req.lora_name
    )
    .into_response())
}
