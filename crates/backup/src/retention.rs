//! Which backups a retention policy keeps (pure; the clock is in the backups' times).
//!
//! The rules are those Proxmox users know: `keep-last N` keeps the N newest; `keep-hourly
//! N` keeps the newest backup of each of the N newest hours that have one, and so on for
//! days, ISO weeks, months and years (UTC). Rules apply in that order, newest first; a
//! period already covered by a backup an earlier rule kept is not counted again.
//! Protected backups are always kept and count for no rule. With no rule set, everything
//! is kept (a policy of all zeros never deletes).

use std::collections::HashSet;

/// The keep rules (the API's type: each 0 = not used).
pub use ferry_types::BackupKeep as Keep;

fn no_rules(k: &Keep) -> bool {
    *k == Keep::default()
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    /// Unix seconds.
    pub time: i64,
    pub protected: bool,
}

/// The verdict on one backup, with the rule that kept it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub id: String,
    pub keep: bool,
    pub reason: &'static str,
}

fn period(rule: &str, t: i64) -> String {
    let dt =
        time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    match rule {
        "hourly" => format!("{}-{}-{}", dt.year(), dt.ordinal(), dt.hour()),
        "daily" => format!("{}-{}", dt.year(), dt.ordinal()),
        "weekly" => {
            let (y, w, _) = dt.to_iso_week_date();
            format!("{y}-w{w}")
        }
        "monthly" => format!("{}-{}", dt.year(), u8::from(dt.month())),
        "yearly" => format!("{}", dt.year()),
        _ => String::new(),
    }
}

/// Decides, for one VM's backups, which to keep. The answer lists every item once,
/// newest first.
pub fn select(items: &[Item], keep: &Keep) -> Vec<Verdict> {
    let mut order: Vec<&Item> = items.iter().collect();
    order.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));
    let mut reason: Vec<Option<&'static str>> = vec![None; order.len()];
    for (i, it) in order.iter().enumerate() {
        if it.protected {
            reason[i] = Some("protected");
        }
    }
    if no_rules(keep) {
        for r in reason.iter_mut().filter(|r| r.is_none()) {
            *r = Some("no retention set");
        }
    } else {
        let mut left = keep.last;
        for (i, r) in reason.iter_mut().enumerate() {
            if left == 0 {
                break;
            }
            if r.is_none() && !order[i].protected {
                *r = Some("keep-last");
                left -= 1;
            }
        }
        for (rule, n) in [
            ("hourly", keep.hourly),
            ("daily", keep.daily),
            ("weekly", keep.weekly),
            ("monthly", keep.monthly),
            ("yearly", keep.yearly),
        ] {
            if n == 0 {
                continue;
            }
            let covered: HashSet<String> = order
                .iter()
                .zip(&reason)
                .filter(|(it, r)| r.is_some() && !it.protected)
                .map(|(it, _)| period(rule, it.time))
                .collect();
            let mut taken: HashSet<String> = HashSet::new();
            let name: &'static str = match rule {
                "hourly" => "keep-hourly",
                "daily" => "keep-daily",
                "weekly" => "keep-weekly",
                "monthly" => "keep-monthly",
                _ => "keep-yearly",
            };
            for (i, it) in order.iter().enumerate() {
                if reason[i].is_some() {
                    continue;
                }
                let p = period(rule, it.time);
                if covered.contains(&p) || taken.contains(&p) {
                    continue;
                }
                if taken.len() >= n as usize {
                    break;
                }
                taken.insert(p);
                reason[i] = Some(name);
            }
        }
    }
    order
        .iter()
        .zip(reason)
        .map(|(it, r)| Verdict {
            id: it.id.clone(),
            keep: r.is_some(),
            reason: r.unwrap_or("pruned"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: i64 = 3600;
    const DAY: i64 = 86400;

    fn items(times: &[i64]) -> Vec<Item> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| Item {
                id: format!("b{i}"),
                time: *t,
                protected: false,
            })
            .collect()
    }

    fn kept(v: &[Verdict]) -> Vec<String> {
        v.iter().filter(|v| v.keep).map(|v| v.id.clone()).collect()
    }

    #[test]
    fn retention_keep_last_keeps_the_newest() {
        let v = select(
            &items(&[10, 20, 30, 40]),
            &Keep {
                last: 2,
                ..Keep::default()
            },
        );
        assert_eq!(kept(&v), vec!["b3", "b2"]);
    }

    #[test]
    fn retention_daily_keeps_the_newest_of_each_day() {
        let base = 1_700_000_000 - 1_700_000_000 % DAY;
        // three backups a day for four days
        let times: Vec<i64> = (0..4)
            .flat_map(|d| (0..3).map(move |h| base + d * DAY + h * HOUR))
            .collect();
        let v = select(
            &items(&times),
            &Keep {
                daily: 3,
                ..Keep::default()
            },
        );
        assert_eq!(kept(&v), vec!["b11", "b8", "b5"]);
    }

    #[test]
    fn retention_days_covered_by_keep_last_are_not_counted_again() {
        let base = 1_700_000_000 - 1_700_000_000 % DAY;
        let times = [base, base + HOUR, base + DAY, base + DAY + HOUR];
        let v = select(
            &items(&times),
            &Keep {
                last: 1,
                daily: 1,
                ..Keep::default()
            },
        );
        // day 2 is covered by keep-last; keep-daily takes day 1's newest
        assert_eq!(kept(&v), vec!["b3", "b1"]);
    }

    #[test]
    fn retention_nothing_set_keeps_everything() {
        let v = select(&items(&[1, 2, 3]), &Keep::default());
        assert!(v.iter().all(|v| v.keep));
    }

    #[test]
    fn retention_protected_backups_stay_and_count_for_nothing() {
        let mut it = items(&[10, 20, 30]);
        it[2].protected = true;
        let v = select(
            &it,
            &Keep {
                last: 1,
                ..Keep::default()
            },
        );
        assert_eq!(kept(&v), vec!["b2", "b1"]);
    }

    fn keep_strategy() -> impl Strategy<Value = Keep> {
        (0u32..4, 0u32..4, 0u32..4, 0u32..3, 0u32..3, 0u32..2).prop_map(
            |(last, hourly, daily, weekly, monthly, yearly)| Keep {
                last,
                hourly,
                daily,
                weekly,
                monthly,
                yearly,
            },
        )
    }

    proptest! {
        #[test]
        fn retention_invariants_hold(
            times in proptest::collection::vec(0i64..(3 * 365 * DAY), 0..40),
            protected in proptest::collection::vec(any::<bool>(), 40),
            keep in keep_strategy(),
        ) {
            let mut it = items(&times);
            for (i, x) in it.iter_mut().enumerate() {
                x.protected = protected[i] && i % 5 == 0;
            }
            let v = select(&it, &keep);
            // every item judged once
            prop_assert_eq!(v.len(), it.len());
            let ids: HashSet<_> = v.iter().map(|x| x.id.clone()).collect();
            prop_assert_eq!(ids.len(), it.len());
            // protected ones kept
            for x in &it {
                if x.protected {
                    prop_assert!(v.iter().any(|y| y.id == x.id && y.keep));
                }
            }
            let n_protected = it.iter().filter(|x| x.protected).count();
            let kept_n = v.iter().filter(|x| x.keep).count();
            if no_rules(&keep) {
                prop_assert_eq!(kept_n, it.len());
            } else {
                let bound = (keep.last + keep.hourly + keep.daily + keep.weekly + keep.monthly + keep.yearly) as usize;
                prop_assert!(kept_n <= bound + n_protected);
                // the newest unprotected backup is kept whenever any rule is set
                let newest = it.iter().filter(|x| !x.protected).max_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
                if let Some(n) = newest {
                    prop_assert!(v.iter().any(|y| y.id == n.id && y.keep));
                }
            }
            // applying the policy to what it kept keeps all of it
            let survivors: Vec<Item> = it.iter().filter(|x| v.iter().any(|y| y.id == x.id && y.keep)).cloned().collect();
            let again = select(&survivors, &keep);
            prop_assert!(again.iter().all(|y| y.keep));
        }
    }
}
