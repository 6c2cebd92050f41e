//! The one place that turns failures into HTTP statuses and OpenAI error bodies
//! `{"error": {"message", "type", "param", "code"}}`.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pagoda_adapters::AdapterError;
use pagoda_engine::EngineError;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Stable label for metrics.
    pub kind: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            kind,
        }
    }

    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            param: param.map(str::to_string),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_json"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or incorrect API key; send `Authorization: Bearer <key>`",
            )
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("the model `{model}` does not exist"),
            )
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {path}"),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this path",
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body exceeds {limit} bytes"),
        )
    }

    pub fn unsupported_media_type(got: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected `Content-Type: application/json`, got `{got}`"),
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    fn error_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::NotFound(name) => Self::model_not_found(&name),
            AdapterError::Model(_) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.kind(), e.to_string())
            }
            _ => Self::new(StatusCode::BAD_REQUEST, e.kind(), e.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let e = match e {
            EngineError::Adapter(a) => return (*a).into(),
            e => e,
        };
        let status = match &e {
            EngineError::InvalidRequest { .. } | EngineError::ContextLength(_) => {
                StatusCode::BAD_REQUEST
            }
            EngineError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            EngineError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::Model(_)
            | EngineError::Config(_)
            | EngineError::Generation(_)
            | EngineError::Adapter(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = match &e {
            EngineError::ContextLength(_) => Some("context_length_exceeded"),
            EngineError::QueueFull(_) => Some("queue_full"),
            _ => None,
        };
        Self {
            status,
            message: e.to_string(),
            param: e.param().map(str::to_string),
            code,
            kind: e.kind(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ApiError {
    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.error_type(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::METRICS
            .errors
            .with_label_values(&[self.kind])
            .inc();
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), "{}", self.message);
        }
        let mut res = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}
