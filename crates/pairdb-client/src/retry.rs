//! Bounded retries with exponential backoff and full jitter. Only what is safe to repeat is retried:
//! reads, and writes that carry an idempotency key (the router stores their outcome, so a repeat
//! returns the first outcome instead of writing twice).

use std::time::Duration;

use pairdb_proto::status::Reason;
use rand::Rng;
use tonic::Code;

use crate::ClientError;

/// How often and how long to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first (1 = no retries).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn never() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// The wait before attempt `attempt + 1` (`attempt` starts at 1): a random duration up to an
    /// exponentially growing cap, or the server's retry-after hint when it gave one.
    pub fn backoff(&self, attempt: u32, error: &ClientError) -> Duration {
        if let Some(hint) = error.metadata("retry_after_ms").and_then(|ms| ms.parse::<u64>().ok()) {
            return Duration::from_millis(hint).min(self.max_backoff);
        }
        let cap =
            self.initial_backoff.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(self.max_backoff);
        let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX).max(1);
        Duration::from_micros(rand::rng().random_range(0..=cap_us))
    }
}

/// Whether a failed call may be repeated. Reads are always safe; a write only when it carries an
/// idempotency key. Only transient conditions are retried.
pub fn is_retryable(error: &ClientError, safe_to_repeat: bool) -> bool {
    if !safe_to_repeat {
        return false;
    }
    match error {
        ClientError::Connect { .. } => true,
        ClientError::Server { code, .. } => {
            matches!(code, Code::Unavailable | Code::Aborted | Code::DeadlineExceeded)
                || error.known_reason() == Some(Reason::RateLimited)
        }
        ClientError::InvalidEndpoint { .. } | ClientError::InvalidToken => false,
    }
}

/// Runs `call` until it succeeds, fails with something not retryable, or the attempts run out.
pub(crate) async fn with_retries<T, F, Fut>(
    policy: RetryPolicy,
    safe_to_repeat: bool,
    mut call: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(error) if attempt < policy.max_attempts && is_retryable(&error, safe_to_repeat) => {
                tokio::time::sleep(policy.backoff(attempt, &error)).await;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: Code, reason: &str) -> ClientError {
        ClientError::Server { code, reason: reason.into(), message: String::new(), metadata: Vec::new() }
    }

    #[test]
    fn only_safe_transient_failures_are_retried() {
        assert!(is_retryable(&server(Code::Unavailable, "QUORUM_NOT_REACHED"), true));
        assert!(!is_retryable(&server(Code::Unavailable, "QUORUM_NOT_REACHED"), false));
        assert!(!is_retryable(&server(Code::InvalidArgument, "INVALID_KEY"), true));
        assert!(!is_retryable(&server(Code::AlreadyExists, "IDEMPOTENCY_KEY_CONFLICT"), true));
        assert!(is_retryable(&server(Code::Aborted, "IDEMPOTENCY_IN_FLIGHT"), true));
        assert!(is_retryable(&server(Code::ResourceExhausted, "RATE_LIMITED"), true));
        assert!(!is_retryable(&server(Code::ResourceExhausted, "VALUE_TOO_LARGE"), true));
    }

    #[test]
    fn backoff_is_bounded_and_honours_hints() {
        let policy = RetryPolicy::default();
        for attempt in 1..40 {
            assert!(policy.backoff(attempt, &server(Code::Unavailable, "X")) <= policy.max_backoff);
        }
        let hinted = ClientError::Server {
            code: Code::ResourceExhausted,
            reason: "RATE_LIMITED".into(),
            message: String::new(),
            metadata: vec![("retry_after_ms".into(), "70".into())],
        };
        assert_eq!(policy.backoff(1, &hinted), Duration::from_millis(70));
    }

    #[tokio::test]
    async fn attempts_are_bounded() {
        let policy = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let mut calls = 0;
        let result: Result<(), _> = with_retries(policy, true, || {
            calls += 1;
            async { Err(server(Code::Unavailable, "QUORUM_NOT_REACHED")) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 3);

        let mut calls = 0;
        let result: Result<(), _> = with_retries(policy, false, || {
            calls += 1;
            async { Err(server(Code::Unavailable, "QUORUM_NOT_REACHED")) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1, "an unkeyed write is never repeated");
    }
}
