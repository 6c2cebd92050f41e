//! The router, shared state and the small pieces every handler uses (auth, body parsing, SSE).
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{header, request::Parts, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use pagoda_engine::EngineHandle;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::ApiError;
use crate::metrics::METRICS;

pub const FINGERPRINT: &str = concat!("pagoda-", env!("CARGO_PKG_VERSION"));
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// An oversized body is drained up to this much before the 413 (then the connection closes).
const MAX_DRAIN_BYTES: usize = 64 << 20;

pub struct AppState {
    /// Set once the model is loaded and warmed up.
    pub engine: OnceLock<EngineHandle>,
    pub served_model_name: String,
    pub api_key: Option<String>,
    pub shutting_down: AtomicBool,
    pub admin: AdminConfig,
    next_id: AtomicU64,
}

/// Who may load and unload adapters at run time, and from where.
#[derive(Clone, Debug, Default)]
pub struct AdminConfig {
    /// Runtime adapter loads only from under this directory; `None` turns them off.
    pub lora_dir: Option<PathBuf>,
    /// When set, admin endpoints want `Authorization: Bearer <token>` (instead of the API key).
    pub admin_token: Option<String>,
}

impl AppState {
    pub fn new(
        served_model_name: String,
        api_key: Option<String>,
        admin: AdminConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            served_model_name,
            api_key,
            admin,
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(unix_now()),
        })
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An authenticated request's view of the server.
#[derive(Clone)]
pub struct Ctx(pub Arc<AppState>);

fn check_bearer(parts: &Parts, key: Option<&str>) -> Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    let given = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

impl FromRequestParts<Arc<AppState>> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        check_bearer(parts, state.api_key.as_deref())?;
        Ok(Ctx(state.clone()))
    }
}

/// A request allowed to use the admin endpoints: the admin token when one is set, else the
/// API key.
pub struct AdminCtx(pub Ctx);

impl FromRequestParts<Arc<AppState>> for AdminCtx {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let key = state
            .admin
            .admin_token
            .as_deref()
            .or(state.api_key.as_deref());
        check_bearer(parts, key)?;
        Ok(AdminCtx(Ctx(state.clone())))
    }
}

impl Ctx {
    pub fn engine(&self) -> Result<EngineHandle, ApiError> {
        if self.0.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.0
            .engine
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("the model is still loading; retry shortly"))
    }

    /// `None` for the base model, the adapter's name for a registered LoRA adapter; 404
    /// otherwise (never a silent fallback to the base model).
    pub fn resolve_model(&self, model: &str) -> Result<Option<String>, ApiError> {
        if model == self.0.served_model_name {
            return Ok(None);
        }
        let known = self
            .0
            .engine
            .get()
            .and_then(|e| e.adapters())
            .is_some_and(|r| r.resolve(model).is_ok());
        if known {
            Ok(Some(model.to_string()))
        } else {
            Err(ApiError::model_not_found(model))
        }
    }

    pub fn new_id(&self) -> String {
        format!("{:x}", self.0.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// A token's text for logprobs.
    pub fn token_text(&self, id: u32) -> String {
        self.0
            .engine
            .get()
            .and_then(|e| e.tokenizer().decode(&[id], false).ok())
            .unwrap_or_default()
    }
}

/// The raw body of a JSON request: content type checked, size limited.
pub struct JsonBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("(not text)");
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if essence != "application/json" {
                return Err(ApiError::unsupported_media_type(ct));
            }
        }
        // Past the limit the rest is read and dropped (up to a point), so the client is still
        // listening when the 413 goes out.
        let mut body = req.into_body().into_data_stream();
        let mut buf = Vec::new();
        let mut total = 0usize;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(None, format!("cannot read the request body: {e}"))
            })?;
            total += chunk.len();
            if total <= MAX_BODY_BYTES {
                buf.extend_from_slice(&chunk);
            } else if total > MAX_DRAIN_BYTES {
                break;
            }
        }
        if total > MAX_BODY_BYTES {
            return Err(ApiError::payload_too_large(MAX_BODY_BYTES));
        }
        Ok(JsonBody(buf.into()))
    }
}

/// Parses JSON into an OpenAI request type; syntax and type errors are 400s that say where.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid_json(
            "the request body is empty; expected a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::bad_request(None, format!("invalid request: {e}"))
        } else {
            ApiError::invalid_json(format!("the request body is not valid JSON: {e}"))
        }
    })
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.shutting_down.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "shutting_down"})),
        )
            .into_response();
    }
    match state.engine.get() {
        Some(_) => axum::Json(json!({"status": "ok"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

/// The base model, then every LoRA adapter with the base as its `parent`.
async fn models(ctx: Ctx) -> Response {
    let state = &ctx.0;
    let engine = state.engine.get();
    let max_model_len = engine.map(|e| e.info().max_context_len);
    let mut data = vec![json!({
        "id": state.served_model_name,
        "object": "model",
        "created": 0,
        "owned_by": "pagoda",
        "root": engine.map(|e| e.info().name.clone()),
        "parent": null,
        "max_model_len": max_model_len,
    })];
    if let Some(registry) = engine.and_then(|e| e.adapters()) {
        data.extend(registry.list().into_iter().map(|a| {
            json!({
                "id": a.name,
                "object": "model",
                "created": 0,
                "owned_by": "pagoda",
                "root": a.path,
                "parent": state.served_model_name,
                "max_model_len": max_model_len,
            })
        }));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let (stats, lora) = match state.engine.get() {
        Some(e) => (e.stats().await.ok(), e.adapters().map(|r| r.stats())),
        None => (None, None),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        METRICS.render(stats, lora),
    )
        .into_response()
}

async fn chat(ctx: Ctx, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    crate::routes::chat::chat_completions(ctx, body).await
}

async fn completions(ctx: Ctx, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    crate::routes::completions::completions(ctx, body).await
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route(
            "/v1/load_lora_adapter",
            post(crate::routes::adapters::load_lora_adapter),
        )
        .route(
            "/v1/unload_lora_adapter",
            post(crate::routes::adapters::unload_lora_adapter),
        )
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn call(app: Router, req: axum::http::Request<Body>) -> (StatusCode, serde_json::Value) {
        let res = app.oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn chat_request() -> axum::http::Request<Body> {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
        axum::http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    #[tokio::test]
    async fn while_loading_health_and_api_answer_503() {
        let state = AppState::new("m".into(), None, AdminConfig::default());
        let (status, v) = call(
            router(state.clone()),
            axum::http::Request::get("/health")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["status"], "loading");
        let (status, v) = call(router(state.clone()), chat_request()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(v["error"]["message"].as_str().unwrap().contains("loading"));
        assert_eq!(v["error"]["type"], "server_error");

        state.shutting_down.store(true, Ordering::Relaxed);
        let (status, v) = call(
            router(state.clone()),
            axum::http::Request::get("/health")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["status"], "shutting_down");
        let (status, _) = call(router(state), chat_request()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
