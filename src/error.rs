//! Every error a client can see, and the one place where each maps to an HTTP status and the
//! OpenAI error envelope: `{"error":{"message","type","code",…},"request_id"}`.

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::ledger::LedgerError;
use crate::wallet::WalletError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("payment required: send a Cashu token in the X-Cashu header, or an API key (Authorization: Bearer sk-…) or a Cashu token (Authorization: Bearer cashu…)")]
    PaymentMissing { required_msat: u64 },
    #[error("invalid API key")]
    InvalidKey,
    #[error("this API key was revoked")]
    KeyRevoked,
    #[error("this API key expired at its Key-Expiry-Time: it pays for nothing more; its balance can still be read and refunded")]
    KeyExpired,
    #[error("insufficient balance: this request may cost up to {required_msat} msat, {available_msat} msat available")]
    InsufficientBalance { required_msat: u64, available_msat: u64 },
    #[error("{0}")]
    Wallet(#[from] WalletError),
    #[error("{0}")]
    BadRequest(String),
    #[error("model '{0}' is not served here; see /v1/models")]
    UnknownModel(String),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("too many requests; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("model '{0}' has no price configured here; the operator must set MODELS_PATH or FIXED_* prices")]
    Unpriced(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFoundResource(String),
    #[error("upstream error: {0}")]
    Upstream(String),
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("prices are unavailable right now (no BTC/USD rate); nothing was charged, retry shortly")]
    PriceUnavailable,
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
    /// An error after an `X-Cashu` token was already redeemed: its value comes back as change.
    #[error("{inner}")]
    ChangeReturned { inner: Box<ApiError>, change: crate::payment::PaidOut },
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::KeyNotFound => ApiError::InvalidKey,
            LedgerError::KeyRevoked => ApiError::KeyRevoked,
            LedgerError::KeyExpired => ApiError::KeyExpired,
            LedgerError::Insufficient { required, available } => {
                ApiError::InsufficientBalance { required_msat: required, available_msat: available }
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::ChangeReturned { inner, .. } => inner.status(),
            ApiError::PaymentMissing { .. } | ApiError::InsufficientBalance { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::InvalidKey => StatusCode::UNAUTHORIZED,
            ApiError::KeyRevoked | ApiError::KeyExpired => StatusCode::FORBIDDEN,
            ApiError::Wallet(w) => match w {
                WalletError::MintUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                WalletError::Pending | WalletError::OverBudget(_) => StatusCode::CONFLICT,
                WalletError::InsufficientFunds | WalletError::Other(_) => StatusCode::BAD_GATEWAY,
                _ => StatusCode::BAD_REQUEST,
            },
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnknownModel(_) | ApiError::NotFound(_) | ApiError::NotFoundResource(_) => StatusCode::NOT_FOUND,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unpriced(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::PriceUnavailable | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind_and_code(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::ChangeReturned { inner, .. } => inner.kind_and_code(),
            ApiError::PaymentMissing { .. } => ("payment_required", "payment_required"),
            ApiError::InsufficientBalance { .. } => ("insufficient_quota", "insufficient_balance"),
            ApiError::InvalidKey => ("invalid_request_error", "invalid_api_key"),
            ApiError::KeyRevoked => ("invalid_request_error", "key_revoked"),
            ApiError::KeyExpired => ("invalid_request_error", "key_expired"),
            ApiError::Wallet(w) => match w {
                WalletError::InvalidToken(_) => ("invalid_request_error", "invalid_token"),
                WalletError::UntrustedMint { .. } => ("invalid_request_error", "untrusted_mint"),
                WalletError::AlreadySpent => ("invalid_request_error", "token_already_spent"),
                WalletError::Pending => ("invalid_request_error", "token_pending"),
                WalletError::UnsupportedUnit(_) => ("invalid_request_error", "unsupported_unit"),
                WalletError::MintUnavailable(_) => ("mint_error", "mint_unavailable"),
                WalletError::InsufficientFunds => ("mint_error", "wallet_insufficient_funds"),
                WalletError::OverBudget(_) => ("invalid_request_error", "over_budget"),
                WalletError::Other(_) => ("mint_error", "mint_error"),
            },
            ApiError::BadRequest(_) => ("invalid_request_error", "bad_request"),
            ApiError::UnknownModel(_) => ("invalid_request_error", "model_not_found"),
            ApiError::BodyTooLarge { .. } => ("invalid_request_error", "body_too_large"),
            ApiError::NotFound(_) | ApiError::NotFoundResource(_) => ("invalid_request_error", "not_found"),
            ApiError::MethodNotAllowed => ("invalid_request_error", "method_not_allowed"),
            ApiError::RequestTimeout => ("invalid_request_error", "request_timeout"),
            ApiError::RateLimited { .. } => ("rate_limit_error", "rate_limited"),
            ApiError::Unpriced(_) => ("service_unavailable", "model_unpriced"),
            ApiError::Conflict(_) => ("invalid_request_error", "conflict"),
            ApiError::Upstream(_) => ("upstream_error", "upstream_error"),
            ApiError::UpstreamTimeout => ("upstream_error", "upstream_timeout"),
            ApiError::PriceUnavailable => ("service_unavailable", "price_unavailable"),
            ApiError::Unavailable(_) => ("service_unavailable", "service_unavailable"),
            ApiError::Internal(_) => ("internal_error", "internal_error"),
        }
    }

    /// Change to return in the `X-Cashu` response header.
    pub fn change(&self) -> Option<&crate::payment::PaidOut> {
        match self {
            ApiError::ChangeReturned { change, .. } => Some(change),
            _ => None,
        }
    }

    /// The client-facing message. Internal details stay in the logs.
    pub fn message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error; quote the request_id to the operator".to_owned(),
            other => other.to_string(),
        }
    }

    /// The OpenAI error envelope.
    pub fn body(&self, request_id: &str) -> Value {
        if let ApiError::ChangeReturned { inner, change } = self {
            let mut body = inner.body(request_id);
            body["error"]["change_msats"] = json!(change.amount_msat);
            return body;
        }
        let (kind, code) = self.kind_and_code();
        let mut error = json!({ "message": self.message(), "type": kind, "code": code });
        match self {
            ApiError::PaymentMissing { required_msat } => {
                error["amount_required_msat"] = json!(required_msat);
            }
            ApiError::InsufficientBalance { required_msat, available_msat } => {
                error["amount_required_msat"] = json!(required_msat);
                error["available_msat"] = json!(available_msat);
            }
            ApiError::Wallet(WalletError::UntrustedMint { accepted, .. }) => {
                error["accepted_mints"] = json!(accepted);
            }
            _ => {}
        }
        json!({ "error": error, "request_id": request_id })
    }

    /// Amount to ask for in a NUT-24 payment request, when this error is a 402.
    pub fn payment_request_msat(&self) -> Option<u64> {
        match self {
            ApiError::ChangeReturned { .. } => None,
            ApiError::PaymentMissing { required_msat } => Some(*required_msat),
            // A NUT-24 wallet pays with X-Cashu, which must cover the whole request.
            ApiError::InsufficientBalance { required_msat, .. } => Some(*required_msat),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let e = ApiError::InsufficientBalance { required_msat: 5000, available_msat: 1000 };
        assert_eq!(e.status(), StatusCode::PAYMENT_REQUIRED);
        let body = e.body("req-1");
        assert_eq!(body["request_id"], "req-1");
        assert_eq!(body["error"]["code"], "insufficient_balance");
        assert_eq!(body["error"]["amount_required_msat"], 5000);
        assert!(body["error"]["message"].as_str().unwrap().contains("5000"));
        assert_eq!(e.payment_request_msat(), Some(5000));
    }

    #[test]
    fn internal_details_are_not_shown() {
        let e = ApiError::Internal("sqlite: disk I/O error at /secret/path".into());
        assert!(!e.body("r")["error"]["message"].as_str().unwrap().contains("secret"));
    }

    #[test]
    fn wallet_errors_map() {
        assert_eq!(ApiError::from(WalletError::AlreadySpent).status(), StatusCode::BAD_REQUEST);
        assert_eq!(ApiError::from(WalletError::MintUnavailable("x".into())).status(), StatusCode::SERVICE_UNAVAILABLE);
        let e = ApiError::from(WalletError::UntrustedMint {
            mint: "http://evil".into(),
            accepted: vec!["http://good".into()],
        });
        assert_eq!(e.body("r")["error"]["accepted_mints"][0], "http://good");
    }
}
