//! Inbound rate limit for clearnet clients: a token bucket per client IP. (Onion clients have no
//! IP; the Tor module limits them per circuit.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Above this many tracked clients, idle ones are forgotten.
const MAX_TRACKED: usize = 100_000;

pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `per_minute == 0` disables the limit.
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter { per_minute, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `ip`'s bucket: `Err(wait)` when it is empty.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check_at(ip, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let capacity = self.per_minute as f64;
        let per_sec = capacity / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED {
            buckets.retain(|_, b| now.duration_since(b.last) < Duration::from_secs(60));
        }
        let bucket = buckets.entry(ip).or_insert(Bucket { tokens: capacity, last: now });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_sec))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_refills() {
        let limiter = RateLimiter::new(60);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..60 {
            assert!(limiter.check_at(ip, t0).is_ok());
        }
        let wait = limiter.check_at(ip, t0).unwrap_err();
        assert!(wait <= Duration::from_secs(1));
        assert!(limiter.check_at(other, t0).is_ok(), "clients are independent");
        assert!(limiter.check_at(ip, t0 + Duration::from_secs(1)).is_ok(), "one token per second refills");
        assert!(RateLimiter::new(0).check_at(ip, t0).is_ok());
    }
}
