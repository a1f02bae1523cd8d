//! Retention of per-request records. A record older than the retention period is folded into
//! one row per day and model (`reservations_rollup`) and deleted, in one transaction. Sums over
//! all time (the conservation identity's `charged_msat`, per-model totals, the dashboard's usage)
//! add the roll-up in, so they do not change; only the request's own record (its id, key and
//! note) goes. Keys keep their own counters (`spent_msat`, `requests`). The dashboard's debits
//! (recorded among the requests, `admin-adjust-…`) are the operator's money moves and are never
//! folded: the batches pass over them.
//!
//! The fold is pure: it takes records in write order and stops at the first one not old enough,
//! so each batch is a prefix of the table (`rowid <= last`), deleted by one range.

use std::collections::BTreeMap;

pub const DAY_SECS: i64 = 86_400;

/// Records folded per writer job: small enough that payments queued behind it wait
/// milliseconds, not the whole table's worth.
pub const BATCH: usize = 2_000;

/// One ended request's record, as the fold needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub rowid: i64,
    pub created_at: i64,
    pub model: String,
    pub state: String,
    pub charged_msat: u64,
    pub uncollected_msat: u64,
}

/// A roll-up row's key: the UTC day the requests began, and their model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Group {
    pub day: i64,
    pub model: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub charged: u64,
    pub released: u64,
    /// Of charged records only, as the ledger's sums count them.
    pub charged_msat: u64,
    pub uncollected_msat: u64,
}

/// What one batch folds: the records up to `last_rowid`, summed per group.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fold {
    pub last_rowid: Option<i64>,
    pub records: usize,
    pub groups: BTreeMap<Group, Counts>,
}

/// The UTC day (its first second) that `at` falls in.
pub fn day_of(at: i64) -> i64 {
    at.div_euclid(DAY_SECS) * DAY_SECS
}

/// Folds `records` (in rowid order) that began before `cutoff`, stopping at the first one that
/// did not, or that is still open or in a state this version does not know (left as is).
pub fn fold(records: impl IntoIterator<Item = Record>, cutoff: i64) -> Fold {
    let mut out = Fold::default();
    for r in records {
        let charged = match r.state.as_str() {
            "charged" => true,
            "released" => false,
            _ => break,
        };
        if r.created_at >= cutoff {
            break;
        }
        let group = Group { day: day_of(r.created_at), model: r.model };
        let counts = out.groups.entry(group).or_default();
        if charged {
            counts.charged += 1;
            counts.charged_msat += r.charged_msat;
        } else {
            counts.released += 1;
        }
        counts.uncollected_msat += r.uncollected_msat;
        out.last_rowid = Some(r.rowid);
        out.records += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rowid: i64, created_at: i64, model: &str, state: &str, charged_msat: u64) -> Record {
        Record { rowid, created_at, model: model.into(), state: state.into(), charged_msat, uncollected_msat: 0 }
    }

    #[test]
    fn days_start_at_utc_midnight() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(DAY_SECS - 1), 0);
        assert_eq!(day_of(DAY_SECS), DAY_SECS);
        assert_eq!(day_of(-1), -DAY_SECS);
    }

    #[test]
    fn folds_old_records_per_day_and_model() {
        let day = 20 * DAY_SECS;
        let no_model = record(5, day + 7, "", "charged", 4_000);
        let mut short = record(6, day + DAY_SECS + 1, "gpt", "charged", 100);
        short.uncollected_msat = 30;
        let records = vec![
            record(1, day + 5, "gpt", "charged", 1_000),
            record(2, day + 6, "gpt", "released", 0),
            record(3, day + 9, "llama", "charged", 250),
            record(4, day + 10, "gpt", "charged", 2_000),
            no_model,
            short,
        ];
        let fold = fold(records, day + 2 * DAY_SECS);
        assert_eq!(fold.last_rowid, Some(6));
        assert_eq!(fold.records, 6);
        let g = |day, model: &str| Group { day, model: model.into() };
        let expected: BTreeMap<Group, Counts> = [
            (g(day, "gpt"), Counts { charged: 2, released: 1, charged_msat: 3_000, uncollected_msat: 0 }),
            (g(day, "llama"), Counts { charged: 1, released: 0, charged_msat: 250, uncollected_msat: 0 }),
            (g(day, ""), Counts { charged: 1, released: 0, charged_msat: 4_000, uncollected_msat: 0 }),
            (g(day + DAY_SECS, "gpt"), Counts { charged: 1, released: 0, charged_msat: 100, uncollected_msat: 30 }),
        ]
        .into_iter()
        .collect();
        assert_eq!(fold.groups, expected);
    }

    #[test]
    fn stops_at_the_first_record_too_young_or_not_ended() {
        let young = fold(
            vec![record(1, 10, "m", "charged", 1), record(2, 100, "m", "charged", 1), record(3, 20, "m", "charged", 1)],
            50,
        );
        // Record 3 is old enough but waits behind record 2: a batch is always a prefix.
        assert_eq!((young.last_rowid, young.records), (Some(1), 1));
        let open = fold(vec![record(1, 10, "m", "released", 0), record(2, 11, "m", "open", 0)], 50);
        assert_eq!((open.last_rowid, open.records), (Some(1), 1));
        let unknown = fold(vec![record(1, 10, "m", "refunded", 0)], 50);
        assert_eq!(unknown, Fold::default());
        assert_eq!(fold(Vec::new(), 50), Fold::default());
    }
}
