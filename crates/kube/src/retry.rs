//! Bounded retries of a lookup (Istio's sidecar path: 30 attempts, 1 s apart).

use std::time::Duration;

use crate::error::KubeError;

/// Which failures are worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    /// Only [`KubeError::is_retryable`] errors (transport, timeout, 429, 5xx).
    Retryable,
    /// Those plus 404 — a mirror/static pod may appear in the API after its sandbox starts.
    RetryableAndNotFound,
    /// Every error, as Istio's plugin does.
    Any,
}

/// Attempt count, pause between attempts, and which errors to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts (at least one is always made).
    pub attempts: u32,
    pub interval: Duration,
    pub retry_on: RetryOn,
}

impl RetryPolicy {
    /// Istio's sidecar pod fetch (`podRetrievalMaxRetries`=30, `podRetrievalInterval`=1 s,
    /// any error).
    pub const ISTIO_SIDECAR: RetryPolicy = RetryPolicy {
        attempts: 30,
        interval: Duration::from_secs(1),
        retry_on: RetryOn::Any,
    };

    /// A single attempt.
    pub const ONCE: RetryPolicy = RetryPolicy {
        attempts: 1,
        interval: Duration::ZERO,
        retry_on: RetryOn::Retryable,
    };

    /// Whether `err` is worth another attempt under this policy.
    pub fn should_retry(&self, err: &KubeError) -> bool {
        match self.retry_on {
            RetryOn::Retryable => err.is_retryable(),
            RetryOn::RetryableAndNotFound => err.is_retryable() || err.is_not_found(),
            RetryOn::Any => true,
        }
    }

    /// Run `op` (given the 1-based attempt number) until it succeeds, fails with an error
    /// not worth retrying, or the attempts are used up; the last error is returned.
    /// `on_retry` is told about each failure that will be retried (for logging, or to stop
    /// early by returning `false`).
    pub fn run<T>(
        &self,
        mut op: impl FnMut(u32) -> Result<T, KubeError>,
        mut on_retry: impl FnMut(u32, &KubeError) -> bool,
    ) -> Result<T, KubeError> {
        let attempts = self.attempts.max(1);
        let mut attempt = 1;
        loop {
            match op(attempt) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if attempt >= attempts || !self.should_retry(&e) || !on_retry(attempt, &e) {
                        return Err(e);
                    }
                }
            }
            attempt += 1;
            std::thread::sleep(self.interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ObjectKind;

    fn not_found() -> KubeError {
        KubeError::NotFound {
            kind: ObjectKind::Pod,
            name: "ns/p".into(),
        }
    }

    fn unreachable() -> KubeError {
        KubeError::Unreachable {
            server: "https://10.96.0.1:443".into(),
            reason: "connection refused".into(),
        }
    }

    fn policy(attempts: u32, retry_on: RetryOn) -> RetryPolicy {
        RetryPolicy {
            attempts,
            interval: Duration::from_millis(1),
            retry_on,
        }
    }

    #[test]
    fn succeeds_after_transient_failures() {
        let mut calls = 0;
        let r = policy(5, RetryOn::Retryable).run(
            |n| {
                calls += 1;
                if n < 3 { Err(unreachable()) } else { Ok(n) }
            },
            |_, _| true,
        );
        assert_eq!(r.expect("third attempt"), 3);
        assert_eq!(calls, 3);
    }

    #[test]
    fn gives_up_after_attempts_with_last_error() {
        let mut calls = 0;
        let r: Result<(), _> = policy(4, RetryOn::Retryable).run(
            |_| {
                calls += 1;
                Err(unreachable())
            },
            |_, _| true,
        );
        assert!(matches!(r, Err(KubeError::Unreachable { .. })));
        assert_eq!(calls, 4);
    }

    /// (policy, error, expected number of calls with 3 attempts)
    #[test]
    fn predicate_per_policy() {
        let cases = [
            (RetryOn::Retryable, not_found as fn() -> KubeError, 1),
            (RetryOn::RetryableAndNotFound, not_found, 3),
            (RetryOn::Any, not_found, 3),
            (RetryOn::Retryable, unreachable, 3),
        ];
        for (on, make, want) in cases {
            let mut calls = 0;
            let _ = policy(3, on).run::<()>(
                |_| {
                    calls += 1;
                    Err(make())
                },
                |_, _| true,
            );
            assert_eq!(calls, want, "{on:?}");
        }
    }

    #[test]
    fn on_retry_can_stop_early_and_zero_attempts_still_tries_once() {
        let mut calls = 0;
        let _ = policy(10, RetryOn::Any).run::<()>(
            |_| {
                calls += 1;
                Err(unreachable())
            },
            |attempt, _| attempt < 2,
        );
        assert_eq!(calls, 2);
        let mut calls = 0;
        let _ = policy(0, RetryOn::Any).run::<()>(
            |_| {
                calls += 1;
                Err(unreachable())
            },
            |_, _| true,
        );
        assert_eq!(calls, 1);
    }
}
