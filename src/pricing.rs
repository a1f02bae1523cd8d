//! Prices and costs. Pure arithmetic, no I/O.
//!
//! Upstream prices are USD per token as decimal strings (OpenRouter schema). They are parsed
//! exactly into pico-USD (1e-12 USD) integers, marked up, and converted with the BTC/USD rate into
//! msat per million tokens, always rounding up. Costs are integer msat, rounded up per part.

use serde::Serialize;

/// 1e-12 USD. Decimal prices with up to 12 fractional digits are exact.
pub type PicoUsd = u128;

const PICO_PER_USD: u128 = 1_000_000_000_000;
const TOKENS_PER_RATE: u128 = 1_000_000;
const MSAT_PER_BTC: u128 = 100_000_000_000;

fn ceil_div(n: u128, d: u128) -> u128 {
    debug_assert!(d > 0);
    n.div_ceil(d)
}

fn saturating_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Parses a non-negative decimal USD amount ("0.0000025", "1e-7", "3") into pico-USD, rounding up
/// any digits beyond the 12th. Negative or malformed values (OpenRouter uses "-1" for "variable")
/// give `None`.
pub fn parse_usd(text: &str) -> Option<PicoUsd> {
    let text = text.trim();
    if text.is_empty() || text.starts_with('-') {
        return None;
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    // digits * 10^(exponent - frac_len) USD, scaled to pico: * 10^12.
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    if digits.len() > 30 {
        return None;
    }
    let value: u128 = digits.parse().ok()?;
    // In i64: an exponent near i32's limits would overflow (the text comes from upstreams).
    let shift = i64::from(exponent) - frac_part.len() as i64 + 12;
    let power = |shift: i64| 10u128.checked_pow(u32::try_from(shift).ok()?);
    if shift >= 0 {
        value.checked_mul(power(shift)?)
    } else {
        Some(ceil_div(value, power(-shift)?))
    }
}

/// Formats pico-USD as a plain decimal string, as the OpenRouter schema shows prices.
pub fn format_usd(pico: PicoUsd) -> String {
    let int = pico / PICO_PER_USD;
    let frac = pico % PICO_PER_USD;
    if frac == 0 {
        return int.to_string();
    }
    let frac = format!("{frac:012}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// A multiplier in basis points: 10_000 is 1.0, 10_500 is +5 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Markup(pub u32);

impl Markup {
    pub const NONE: Markup = Markup(10_000);

    /// From a factor such as 1.05; non-finite or below 1.0 is refused (selling below cost is a
    /// configuration mistake we do not guess around).
    pub fn from_factor(factor: f64) -> Option<Markup> {
        if !factor.is_finite() || !(1.0..=100.0).contains(&factor) {
            return None;
        }
        Some(Markup((factor * 10_000.0).round() as u32))
    }

    pub fn then(self, other: Markup) -> Markup {
        Markup(u32::try_from(ceil_div(self.0 as u128 * other.0 as u128, 10_000)).unwrap_or(u32::MAX))
    }

    pub fn factor(self) -> f64 {
        self.0 as f64 / 10_000.0
    }

    fn apply(self, pico: PicoUsd) -> PicoUsd {
        ceil_div(pico.saturating_mul(self.0 as u128), 10_000)
    }
}

/// Model prices in USD (per token; `request` per request), the OpenRouter `pricing` object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsdPrices {
    pub prompt: PicoUsd,
    pub completion: PicoUsd,
    pub request: PicoUsd,
    pub image: PicoUsd,
    pub web_search: PicoUsd,
    pub internal_reasoning: PicoUsd,
    pub input_cache_read: PicoUsd,
    pub input_cache_write: PicoUsd,
}

impl UsdPrices {
    /// Only what the node charges: it meters tokens and requests, so the image, web search and
    /// reasoning prices (reasoning tokens are counted as completion tokens) show as 0, as in
    /// `sats_pricing`.
    pub fn charged(&self) -> UsdPrices {
        UsdPrices { image: 0, web_search: 0, internal_reasoning: 0, ..self.clone() }
    }

    pub fn with_markup(&self, markup: Markup) -> UsdPrices {
        UsdPrices {
            prompt: markup.apply(self.prompt),
            completion: markup.apply(self.completion),
            request: markup.apply(self.request),
            image: markup.apply(self.image),
            web_search: markup.apply(self.web_search),
            internal_reasoning: markup.apply(self.internal_reasoning),
            input_cache_read: markup.apply(self.input_cache_read),
            input_cache_write: markup.apply(self.input_cache_write),
        }
    }

    /// Parses an OpenRouter `pricing` JSON object. Missing fields are 0; a missing or invalid
    /// `prompt` or `completion` makes the whole price unknown.
    pub fn from_json(value: &serde_json::Value) -> Option<UsdPrices> {
        let field = |name: &str| -> Option<PicoUsd> {
            match value.get(name) {
                None | Some(serde_json::Value::Null) => Some(0),
                Some(serde_json::Value::String(s)) => parse_usd(s),
                Some(serde_json::Value::Number(n)) => parse_usd(&n.to_string()),
                Some(_) => None,
            }
        };
        value.get("prompt")?;
        value.get("completion")?;
        Some(UsdPrices {
            prompt: field("prompt")?,
            completion: field("completion")?,
            request: field("request").unwrap_or(0),
            image: field("image").unwrap_or(0),
            web_search: field("web_search").unwrap_or(0),
            internal_reasoning: field("internal_reasoning").unwrap_or(0),
            input_cache_read: field("input_cache_read").unwrap_or(0),
            input_cache_write: field("input_cache_write").unwrap_or(0),
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt": format_usd(self.prompt),
            "completion": format_usd(self.completion),
            "request": format_usd(self.request),
            "image": format_usd(self.image),
            "web_search": format_usd(self.web_search),
            "internal_reasoning": format_usd(self.internal_reasoning),
            "input_cache_read": format_usd(self.input_cache_read),
            "input_cache_write": format_usd(self.input_cache_write),
        })
    }
}

/// BTC/USD, in US cents per bitcoin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BtcRate {
    pub cents_per_btc: u64,
}

impl BtcRate {
    pub fn from_usd(usd_per_btc: f64) -> Option<BtcRate> {
        if !usd_per_btc.is_finite() || !(1.0..=1e12).contains(&usd_per_btc) {
            return None;
        }
        Some(BtcRate { cents_per_btc: (usd_per_btc * 100.0).round() as u64 })
    }

    pub fn usd_per_btc(self) -> f64 {
        self.cents_per_btc as f64 / 100.0
    }

    /// msat → USD, for display only.
    pub fn msat_to_usd(self, msat: u64) -> f64 {
        msat as f64 * self.usd_per_btc() / MSAT_PER_BTC as f64
    }

    /// msat → USD as text with 8 decimals (rounded half up), for display: exact, in integers
    /// (formatting a float to a precision is slow, and this is on every paid answer).
    pub fn msat_to_usd_text(self, msat: u64) -> String {
        // USD × 1e8 = msat × (cents ÷ 100) ÷ 1e11 × 1e8 = msat × cents ÷ 1e5.
        let e8 = (u128::from(msat) * u128::from(self.cents_per_btc) + 50_000) / 100_000;
        let Ok(mut rest) = u64::try_from(e8) else {
            return format!("{}.{:08}", e8 / 100_000_000, e8 % 100_000_000);
        };
        // From the last digit: eight decimals, the point, then the whole part's digits.
        let mut text = [0u8; 32];
        let mut at = text.len();
        for i in 0.. {
            if i == 8 {
                at -= 1;
                text[at] = b'.';
            }
            at -= 1;
            text[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 && i >= 8 {
                break;
            }
        }
        String::from_utf8_lossy(&text[at..]).into_owned()
    }

    /// pico-USD → msat, rounded up: msat = pUSD × 1e11 / (1e12 × cents/100) = pUSD × 10 / cents.
    fn pico_usd_to_msat_ceil(self, pico: u128) -> u128 {
        ceil_div(pico.saturating_mul(10), self.cents_per_btc.max(1) as u128)
    }
}

/// Prices in msat: per million tokens for token prices, per request for the request fee.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MsatPrices {
    pub prompt_per_mtok: u128,
    pub completion_per_mtok: u128,
    pub cache_read_per_mtok: u128,
    pub cache_write_per_mtok: u128,
    pub request_msat: u64,
}

impl MsatPrices {
    /// Converts USD prices at a BTC rate, rounding every rate up. A missing cache price falls back
    /// to the prompt price, so cached tokens are never free by omission.
    pub fn from_usd(usd: &UsdPrices, rate: BtcRate) -> MsatPrices {
        let per_mtok = |p: PicoUsd| rate.pico_usd_to_msat_ceil(p.saturating_mul(TOKENS_PER_RATE));
        let or_prompt = |p: PicoUsd| if p == 0 { usd.prompt } else { p };
        MsatPrices {
            prompt_per_mtok: per_mtok(usd.prompt),
            completion_per_mtok: per_mtok(usd.completion),
            cache_read_per_mtok: per_mtok(or_prompt(usd.input_cache_read)),
            cache_write_per_mtok: per_mtok(or_prompt(usd.input_cache_write)),
            request_msat: saturating_u64(rate.pico_usd_to_msat_ceil(usd.request)),
        }
    }

    /// These prices in USD at `rate` (for display: `/v1/models`' `pricing` of a model sold at
    /// fixed sats prices).
    pub fn to_usd(&self, rate: BtcRate) -> UsdPrices {
        // pico-USD per msat = cents per BTC / 10; per token = per million tokens / 1e6.
        let per_token = |per_mtok: u128| ceil_div(per_mtok.saturating_mul(rate.cents_per_btc as u128), 10_000_000);
        UsdPrices {
            prompt: per_token(self.prompt_per_mtok),
            completion: per_token(self.completion_per_mtok),
            request: ceil_div((self.request_msat as u128).saturating_mul(rate.cents_per_btc as u128), 10),
            input_cache_read: per_token(self.cache_read_per_mtok),
            input_cache_write: per_token(self.cache_write_per_mtok),
            ..UsdPrices::default()
        }
    }

    /// Routstr Core's FIXED_* settings, all in sats.
    pub fn fixed(per_request_sats: f64, per_1k_input_sats: f64, per_1k_output_sats: f64) -> MsatPrices {
        let to_units = |v: f64, scale: f64| -> u128 {
            if v.is_finite() && v > 0.0 {
                (v * scale).ceil() as u128
            } else {
                0
            }
        };
        // sats per 1k tokens → msat per 1M tokens: × 1000 (msat) × 1000 (1k → 1M).
        let input = to_units(per_1k_input_sats, 1_000_000.0);
        let output = to_units(per_1k_output_sats, 1_000_000.0);
        MsatPrices {
            prompt_per_mtok: input,
            completion_per_mtok: output,
            cache_read_per_mtok: input,
            cache_write_per_mtok: input,
            request_msat: saturating_u64(to_units(per_request_sats, 1000.0)),
        }
    }

    fn tokens_msat(tokens: u64, per_mtok: u128) -> u128 {
        ceil_div((tokens as u128).saturating_mul(per_mtok), TOKENS_PER_RATE)
    }

    /// The cost of what the upstream reported.
    pub fn cost(&self, usage: &Usage) -> Cost {
        let input = Self::tokens_msat(usage.input_tokens, self.prompt_per_mtok)
            .saturating_add(Self::tokens_msat(usage.cache_read_tokens, self.cache_read_per_mtok))
            .saturating_add(Self::tokens_msat(usage.cache_write_tokens, self.cache_write_per_mtok));
        let output = Self::tokens_msat(usage.output_tokens, self.completion_per_mtok);
        Cost::new(self.request_msat, saturating_u64(input), saturating_u64(output))
    }

    /// The most a request may cost: what is reserved before it is forwarded.
    pub fn max_cost(&self, prompt_tokens: u64, max_completion_tokens: u64) -> Cost {
        self.cost(&Usage { input_tokens: prompt_tokens, output_tokens: max_completion_tokens, ..Usage::default() })
    }

    /// Per-token price in sats, for display.
    pub fn sats_per_token(per_mtok: u128) -> f64 {
        per_mtok as f64 / TOKENS_PER_RATE as f64 / 1000.0
    }
}

/// Token counts, normalised: `input_tokens` excludes cache reads and writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

/// A charge in msat, by part. `total = base + input + output + rounding`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Cost {
    pub base_msats: u64,
    pub input_msats: u64,
    pub output_msats: u64,
    /// Sub-sat rest of a stateless payment, whose change can only be whole sats: charged, and
    /// shown here rather than kept silently.
    #[serde(skip_serializing_if = "is_zero")]
    pub rounding_msats: u64,
    pub total_msats: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Cost {
    pub fn new(base: u64, input: u64, output: u64) -> Cost {
        Cost {
            base_msats: base,
            input_msats: input,
            output_msats: output,
            rounding_msats: 0,
            total_msats: base.saturating_add(input).saturating_add(output),
        }
    }

    /// The same cost plus a rounding part.
    pub fn with_rounding(self, rounding_msats: u64) -> Cost {
        Cost { rounding_msats, total_msats: self.total_msats.saturating_add(rounding_msats), ..self }
    }
}

/// msat as (possibly fractional) sats, for display.
pub fn msat_to_sats(msat: u64) -> f64 {
    msat as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_prices_exactly() {
        assert_eq!(parse_usd("0.0000025"), Some(2_500_000));
        assert_eq!(parse_usd("3"), Some(3 * PICO_PER_USD));
        assert_eq!(parse_usd("0"), Some(0));
        assert_eq!(parse_usd("0.000000000001"), Some(1));
        assert_eq!(parse_usd("1e-7"), Some(100_000));
        for extreme in ["1e2147483647", "1.5e2147483647", "1e-2147483648", "0.123e-2147483648"] {
            assert_eq!(parse_usd(extreme), None, "{extreme}");
        }
        assert_eq!(parse_usd("2.5E-6"), Some(2_500_000));
        assert_eq!(parse_usd(".5"), Some(PICO_PER_USD / 2));
    }

    #[test]
    fn usd_text_is_exact_with_eight_decimals() {
        let rate = BtcRate::from_usd(100_000.0).unwrap();
        assert_eq!(rate.msat_to_usd_text(0), "0.00000000");
        // 1 sat = 1e-8 BTC = 0.001 USD at 100,000 USD per BTC.
        assert_eq!(rate.msat_to_usd_text(1_000), "0.00100000");
        assert_eq!(rate.msat_to_usd_text(1), "0.00000100");
        assert_eq!(rate.msat_to_usd_text(300_000_000_000), "300000.00000000");
        // Half a hundred-millionth rounds up, less rounds down.
        let odd = BtcRate { cents_per_btc: 5 };
        assert_eq!(odd.msat_to_usd_text(10_000), "0.00000001");
        assert_eq!(odd.msat_to_usd_text(9_999), "0.00000000");
        assert_eq!(odd.msat_to_usd_text(1_000_000), "0.00000050");
        assert_eq!(BtcRate { cents_per_btc: u64::MAX }.msat_to_usd_text(u64::MAX).len(), 35);
        // The largest written without 128-bit arithmetic, and the first beyond it.
        let (whole, frac) = (u64::MAX / 100_000_000, u64::MAX % 100_000_000);
        assert_eq!(BtcRate { cents_per_btc: 100_000 }.msat_to_usd_text(u64::MAX), format!("{whole}.{frac:08}"));
        assert_eq!(BtcRate { cents_per_btc: 100_001 }.msat_to_usd_text(u64::MAX).len(), 21);
        // What the float it replaces shows, wherever that is exact enough to say.
        for msat in [1, 7, 1_234, 98_765, 5_000_000, 123_456_789] {
            let rate = BtcRate::from_usd(67_891.23).unwrap();
            assert_eq!(rate.msat_to_usd_text(msat), format!("{:.8}", rate.msat_to_usd(msat)), "{msat}");
        }
    }

    #[test]
    fn sub_pico_digits_round_up() {
        assert_eq!(parse_usd("0.0000000000001"), Some(1));
        assert_eq!(parse_usd("0.0000000000011"), Some(2));
    }

    #[test]
    fn refuses_negative_and_garbage() {
        assert_eq!(parse_usd("-1"), None);
        assert_eq!(parse_usd("abc"), None);
        assert_eq!(parse_usd(""), None);
        assert_eq!(parse_usd("1.2.3"), None);
        assert_eq!(parse_usd("."), None);
    }

    #[test]
    fn formats_round_trip() {
        for s in ["0.0000025", "3", "0", "0.000000000001", "12.5"] {
            assert_eq!(format_usd(parse_usd(s).unwrap()), s);
        }
    }

    #[test]
    fn converts_to_msat_per_mtok() {
        let usd = UsdPrices { prompt: 2_500_000, completion: 10_000_000, ..Default::default() };
        let rate = BtcRate::from_usd(100_000.0).unwrap();
        let msat = MsatPrices::from_usd(&usd, rate);
        // 2.5e-6 USD/token at 100k USD/BTC = 2.5 msat/token.
        assert_eq!(msat.prompt_per_mtok, 2_500_000);
        assert_eq!(msat.completion_per_mtok, 10_000_000);
        // Cache prices fall back to the prompt price.
        assert_eq!(msat.cache_read_per_mtok, 2_500_000);
    }

    #[test]
    fn costs_round_up_per_part() {
        let p =
            MsatPrices { prompt_per_mtok: 2_500_000, completion_per_mtok: 1, request_msat: 7, ..Default::default() };
        let c = p.cost(&Usage { input_tokens: 3, output_tokens: 1, ..Default::default() });
        assert_eq!(c.input_msats, 8); // 7.5 → 8
        assert_eq!(c.output_msats, 1); // 0.000001 → 1
        assert_eq!(c.base_msats, 7);
        assert_eq!(c.total_msats, 16);
        let zero = p.cost(&Usage::default());
        assert_eq!(zero.total_msats, 7);
    }

    #[test]
    fn conversion_rounds_up() {
        // 1 pico-USD at 100k USD/BTC is 1e-6 msat: rounds up to 1.
        let rate = BtcRate::from_usd(100_000.0).unwrap();
        assert_eq!(rate.pico_usd_to_msat_ceil(1), 1);
        assert_eq!(rate.pico_usd_to_msat_ceil(0), 0);
    }

    #[test]
    fn markup_applies_and_composes() {
        let m = Markup::from_factor(1.05).unwrap().then(Markup::from_factor(1.005).unwrap());
        assert_eq!(m.0, 10_553); // 1.05525 rounded up in bps
        let usd = UsdPrices { prompt: 1_000_000, ..Default::default() };
        assert_eq!(usd.with_markup(m).prompt, 1_055_300);
        assert!(Markup::from_factor(0.5).is_none());
        assert!(Markup::from_factor(f64::NAN).is_none());
    }

    #[test]
    fn absurd_numbers_saturate_instead_of_wrapping() {
        let p = MsatPrices {
            prompt_per_mtok: u128::MAX / 2,
            completion_per_mtok: u128::MAX,
            request_msat: u64::MAX,
            ..Default::default()
        };
        let c = p.max_cost(u64::MAX, u64::MAX);
        assert_eq!(c.total_msats, u64::MAX);
        let usd = UsdPrices { prompt: u128::MAX, ..Default::default() };
        assert_eq!(usd.with_markup(Markup(20_000)).prompt, u128::MAX / 10_000 + 1);
    }

    #[test]
    fn fixed_prices_in_sats() {
        let p = MsatPrices::fixed(1.0, 0.5, 2.0);
        assert_eq!(p.request_msat, 1000);
        let c = p.cost(&Usage { input_tokens: 1000, output_tokens: 1000, ..Default::default() });
        assert_eq!(c.input_msats, 500);
        assert_eq!(c.output_msats, 2000);
        assert_eq!(c.total_msats, 3500);
    }

    #[test]
    fn max_cost_covers_every_outcome_within_limits() {
        let p = MsatPrices {
            prompt_per_mtok: 333_333,
            completion_per_mtok: 777_777,
            request_msat: 3,
            ..Default::default()
        };
        let max = p.max_cost(100, 50);
        for input in [0, 1, 99, 100] {
            for output in [0, 1, 49, 50] {
                let c = p.cost(&Usage { input_tokens: input, output_tokens: output, ..Default::default() });
                assert!(c.total_msats <= max.total_msats);
            }
        }
    }

    #[test]
    fn parses_openrouter_pricing_json() {
        let v = serde_json::json!({"prompt": "0.000001", "completion": "0.000002", "request": "0", "image": "-1"});
        let p = UsdPrices::from_json(&v).unwrap();
        assert_eq!(p.prompt, 1_000_000);
        assert_eq!(p.completion, 2_000_000);
        assert_eq!(p.image, 0);
        assert!(UsdPrices::from_json(&serde_json::json!({"prompt": "-1", "completion": "0"})).is_none());
        assert!(UsdPrices::from_json(&serde_json::json!({"completion": "0"})).is_none());
    }
}
