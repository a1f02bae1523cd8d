//! BTC/USD from several public exchanges: the lowest of those that answer (the rate that gives
//! the operator the most sats per USD of upstream cost), refreshed on a timer. `BTC_USD_PRICE`
//! fixes it instead, so the node runs offline.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;

use crate::pricing::BtcRate;

/// One exchange: where to ask and where the price sits in its JSON answer.
#[derive(Debug, Clone)]
pub struct RateSource {
    pub name: &'static str,
    pub url: &'static str,
    pub extract: fn(&Value) -> Option<f64>,
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
}

pub const SOURCES: &[RateSource] = &[
    RateSource {
        name: "kraken",
        url: "https://api.kraken.com/0/public/Ticker?pair=XBTUSD",
        extract: |v| number(v.pointer("/result/XXBTZUSD/c/0")?),
    },
    RateSource {
        name: "coinbase",
        url: "https://api.coinbase.com/v2/prices/BTC-USD/spot",
        extract: |v| number(v.pointer("/data/amount")?),
    },
    RateSource {
        name: "bitstamp",
        url: "https://www.bitstamp.net/api/v2/ticker/btcusd/",
        extract: |v| number(v.get("last")?),
    },
    RateSource {
        name: "bitfinex",
        url: "https://api-pub.bitfinex.com/v2/ticker/tBTCUSD",
        extract: |v| number(v.get(6)?),
    },
];

/// The lowest valid rate among the answers.
pub fn lowest(rates: impl IntoIterator<Item = f64>) -> Option<BtcRate> {
    rates.into_iter().filter_map(BtcRate::from_usd).min_by_key(|r| r.cents_per_btc)
}

/// The current rate, shared by every request.
#[derive(Clone, Default)]
pub struct RateFeed {
    current: Arc<RwLock<Option<BtcRate>>>,
}

impl RateFeed {
    pub fn fixed(rate: BtcRate) -> RateFeed {
        RateFeed { current: Arc::new(RwLock::new(Some(rate))) }
    }

    pub fn get(&self) -> Option<BtcRate> {
        self.current.read().ok().and_then(|g| *g)
    }

    pub fn set(&self, rate: BtcRate) {
        if let Ok(mut g) = self.current.write() {
            *g = Some(rate);
        }
    }

    /// Asks every source at once; keeps the old rate when none answers.
    pub async fn refresh(&self, client: &reqwest::Client, sources: &[RateSource]) -> Option<BtcRate> {
        let asks = sources.iter().map(|source| async move {
            let answer = async {
                let resp = client.get(source.url).timeout(Duration::from_secs(10)).send().await.ok()?;
                let json: Value = resp.error_for_status().ok()?.json().await.ok()?;
                (source.extract)(&json)
            }
            .await;
            if answer.is_none() {
                tracing::debug!(source = source.name, "BTC/USD source did not answer");
            }
            answer
        });
        let answers = futures_util::future::join_all(asks).await;
        let rate = lowest(answers.into_iter().flatten());
        match rate {
            Some(rate) => {
                self.set(rate);
                tracing::info!(usd_per_btc = rate.usd_per_btc(), "BTC/USD rate updated");
            }
            None => tracing::warn!("no exchange answered for BTC/USD; keeping the previous rate"),
        }
        rate
    }

    /// Refreshes now and then every `every`; retries sooner while no rate is known.
    pub fn spawn_refresh(&self, client: reqwest::Client, every: Duration) -> tokio::task::JoinHandle<()> {
        let feed = self.clone();
        tokio::spawn(async move {
            loop {
                feed.refresh(&client, SOURCES).await;
                let wait = if feed.get().is_some() { every } else { Duration::from_secs(15).min(every) };
                tokio::time::sleep(wait).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extracts_each_exchange_format() {
        let answers = [
            json!({"result": {"XXBTZUSD": {"c": ["97000.1", "0.1"]}}}),
            json!({"data": {"amount": "96950.00", "base": "BTC"}}),
            json!({"last": "97010", "high": "1"}),
            json!([1, 2, 3, 4, 5, 6, 96990.5, 8]),
        ];
        let got: Vec<f64> = SOURCES.iter().zip(&answers).filter_map(|(s, a)| (s.extract)(a)).collect();
        assert_eq!(got, vec![97000.1, 96950.0, 97010.0, 96990.5]);
        assert_eq!(lowest(got), BtcRate::from_usd(96950.0));
    }

    #[test]
    fn ignores_nonsense_answers() {
        assert_eq!((SOURCES[1].extract)(&json!({"data": {}})), None);
        assert_eq!(lowest([f64::NAN, -5.0, 0.0]), None);
        assert_eq!(lowest([]), None);
    }
}
