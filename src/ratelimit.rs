//! Inbound rate limit: a token bucket per client, a clearnet client by its IP address (an IPv6
//! one by its /64), an onion client by its circuit (it has no address).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Above this many tracked clients, idle ones are forgotten.
const MAX_TRACKED: usize = 100_000;
/// Looking for idle clients walks the whole table: at most this often.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// While the table is full of active clients, new ones share this one bucket (an address no
/// peer can have).
const OVERFLOW: Client = Client::Ip(IpAddr::V6(Ipv6Addr::UNSPECIFIED));

/// Who a bucket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    Ip(IpAddr),
    /// An onion service circuit, numbered by the node.
    Circuit(u64),
}

pub struct RateLimiter {
    per_minute: u32,
    state: Mutex<Table>,
}

struct Table {
    buckets: HashMap<Client, Bucket>,
    next_prune: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The client a bucket is for: an IPv6 client is its /64 (one subscriber gets a whole /64, and
/// could otherwise take a fresh bucket per address); an IPv4-mapped address is its IPv4 one.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
        v4 => v4,
    }
}

impl Client {
    fn bucket_key(self) -> Client {
        match self {
            Client::Ip(ip) => Client::Ip(client_of(ip)),
            circuit => circuit,
        }
    }
}

impl From<IpAddr> for Client {
    fn from(ip: IpAddr) -> Client {
        Client::Ip(ip)
    }
}

impl RateLimiter {
    /// `per_minute == 0` disables the limit.
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter { per_minute, state: Mutex::new(Table { buckets: HashMap::new(), next_prune: None }) }
    }

    /// Takes one request from `client`'s bucket: `Err(wait)` when it is empty.
    pub fn check(&self, client: Client) -> Result<(), Duration> {
        self.check_at(client, Instant::now())
    }

    fn check_at(&self, client: impl Into<Client>, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let capacity = self.per_minute as f64;
        let per_sec = capacity / 60.0;
        let mut table = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Table { buckets, next_prune } = &mut *table;
        if buckets.len() >= MAX_TRACKED && next_prune.is_none_or(|at| now >= at) {
            buckets.retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(60));
            *next_prune = Some(now + PRUNE_EVERY);
        }
        let mut client = client.into().bucket_key();
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&client) {
            client = OVERFLOW;
        }
        let bucket = buckets.entry(client).or_insert(Bucket { tokens: capacity, last: now });
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

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_one_its_ipv4() {
        let limiter = RateLimiter::new(2);
        let t0 = Instant::now();
        for ip in ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9"] {
            assert!(limiter.check_at(ip.parse::<IpAddr>().unwrap(), t0).is_ok());
        }
        assert!(limiter.check_at("2001:db8:1:2::7".parse::<IpAddr>().unwrap(), t0).is_err(), "one bucket for the /64");
        assert!(limiter.check_at("2001:db8:1:3::1".parse::<IpAddr>().unwrap(), t0).is_ok(), "another /64");
        assert_eq!(client_of("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn onion_circuits_have_buckets_of_their_own() {
        let limiter = RateLimiter::new(1);
        let t0 = Instant::now();
        assert!(limiter.check_at(Client::Circuit(7), t0).is_ok());
        assert!(limiter.check_at(Client::Circuit(7), t0).is_err());
        assert!(limiter.check_at(Client::Circuit(8), t0).is_ok(), "another circuit");
    }

    #[test]
    fn a_full_table_of_active_clients_is_walked_once_a_second_and_newcomers_share_a_bucket() {
        let limiter = RateLimiter::new(60);
        let t0 = Instant::now();
        for n in 0..MAX_TRACKED as u32 {
            assert!(limiter.check_at(IpAddr::V4(n.into()), t0).is_ok());
        }
        // Full of clients active this minute: nothing to forget; newcomers share one bucket.
        let started = Instant::now();
        for n in 0..60u32 {
            assert!(limiter.check_at(IpAddr::V4((u32::MAX - n).into()), t0).is_ok());
        }
        assert!(limiter.check_at(IpAddr::V4((u32::MAX - 100).into()), t0).is_err(), "the shared bucket is empty");
        assert!(started.elapsed() < Duration::from_secs(1), "no walk of the table per request");
        assert!(limiter.check_at(IpAddr::V4(5.into()), t0).is_ok(), "known clients keep their own bucket");
        // A minute later the idle ones are forgotten and newcomers get buckets of their own.
        let later = t0 + Duration::from_secs(61);
        assert!(limiter.check_at(IpAddr::V4((u32::MAX - 100).into()), later).is_ok());
        assert!(limiter.state.lock().unwrap().buckets.len() < 10);
    }
}
