//! When a backup job runs (pure): calendar events in the form Proxmox users write,
//! in UTC.
//!
//! ```text
//! daily 02:00          every day at 02:00
//! mon..fri 22:30       weekdays at 22:30
//! sat,sun 03:15,15:15  weekends, twice
//! 02:00                every day (the days are optional)
//! *:15                 every hour at a quarter past
//! hourly | daily | weekly (monday 00:00) | 4h (every 4 hours from 00:00)
//! ```

use std::collections::BTreeSet;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A parsed schedule: on which weekdays (0 = Monday), at which times of day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    days: [bool; 7],
    times: BTreeSet<(u8, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Schedule {spec:?}: {why} (write e.g. \"daily 02:00\", \"mon..fri 22:30\", \"*:15\", \"hourly\")")]
pub struct CalendarError {
    pub spec: String,
    pub why: String,
}

fn day(s: &str) -> Option<usize> {
    DAYS.iter().position(|d| s.eq_ignore_ascii_case(d))
}

impl Calendar {
    pub fn parse(spec: &str) -> Result<Calendar, CalendarError> {
        let err = |why: &str| CalendarError {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        if spec.len() > 200 {
            return Err(err("too long"));
        }
        let words: Vec<&str> = spec.split_whitespace().collect();
        let all = [true; 7];
        let every_hour = |m: u8| (0..24u8).map(|h| (h, m)).collect::<BTreeSet<_>>();
        match words.as_slice() {
            ["hourly"] => {
                return Ok(Calendar {
                    days: all,
                    times: every_hour(0),
                })
            }
            ["daily"] => {
                return Ok(Calendar {
                    days: all,
                    times: [(0, 0)].into(),
                })
            }
            ["weekly"] => {
                let mut days = [false; 7];
                days[0] = true;
                return Ok(Calendar {
                    days,
                    times: [(0, 0)].into(),
                });
            }
            [w] if w.ends_with('h') && w.len() <= 3 => {
                let n: u8 = w[..w.len() - 1]
                    .parse()
                    .map_err(|_| err("an interval is 1h to 12h"))?;
                if !(1..=12).contains(&n) {
                    return Err(err("an interval is 1h to 12h"));
                }
                return Ok(Calendar {
                    days: all,
                    times: (0..24u8).step_by(n as usize).map(|h| (h, 0)).collect(),
                });
            }
            _ => {}
        }
        let (days_part, times_part) = match words.as_slice() {
            [t] => (None, *t),
            [d, t] => (Some(*d), *t),
            _ => return Err(err("expected [DAYS] TIMES")),
        };
        let days = match days_part {
            None | Some("daily") => all,
            Some(d) => {
                let mut days = [false; 7];
                for part in d.split(',') {
                    match part.split_once("..") {
                        Some((a, b)) => {
                            let (a, b) = (
                                day(a).ok_or_else(|| err("unknown day"))?,
                                day(b).ok_or_else(|| err("unknown day"))?,
                            );
                            // a range may wrap: sat..mon
                            let mut i = a;
                            loop {
                                days[i] = true;
                                if i == b {
                                    break;
                                }
                                i = (i + 1) % 7;
                            }
                        }
                        None => days[day(part).ok_or_else(|| err("unknown day"))?] = true,
                    }
                }
                days
            }
        };
        let mut times = BTreeSet::new();
        for t in times_part.split(',') {
            let (h, m) = t
                .split_once(':')
                .ok_or_else(|| err("a time is HH:MM or *:MM"))?;
            let m: u8 = m
                .parse()
                .ok()
                .filter(|m| *m < 60)
                .ok_or_else(|| err("minutes are 00 to 59"))?;
            if h == "*" {
                times.extend(every_hour(m));
            } else {
                let h: u8 = h
                    .parse()
                    .ok()
                    .filter(|h| *h < 24)
                    .ok_or_else(|| err("hours are 00 to 23"))?;
                times.insert((h, m));
            }
        }
        if times.is_empty() {
            return Err(err("no time given"));
        }
        Ok(Calendar { days, times })
    }

    /// Whether the minute starting at unix second `t` (a multiple of 60) is one of the
    /// schedule's.
    pub fn matches(&self, t: i64) -> bool {
        let Ok(dt) = time::OffsetDateTime::from_unix_timestamp(t) else {
            return false;
        };
        let wd = usize::from(dt.weekday().number_days_from_monday());
        self.days[wd] && self.times.contains(&(dt.hour(), dt.minute()))
    }

    /// The first scheduled minute strictly after `t` (unix seconds); every schedule
    /// has one within a week.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        let start = t.div_euclid(60) * 60 + 60;
        (0..8 * 24 * 60)
            .map(|i| start + i * 60)
            .find(|m| self.matches(*m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // 2026-12-07 00:00 UTC is a Monday
    const MONDAY: i64 = 1_796_601_600;

    #[test]
    fn calendar_daily_runs_at_its_time() {
        let c = Calendar::parse("daily 02:00").unwrap();
        assert_eq!(c.next_after(MONDAY), Some(MONDAY + 2 * 3600));
        assert_eq!(c.next_after(MONDAY + 2 * 3600), Some(MONDAY + 26 * 3600));
    }

    #[test]
    fn calendar_weekdays_skip_the_weekend() {
        let c = Calendar::parse("mon..fri 22:30").unwrap();
        // Friday 22:30 → Monday 22:30
        let friday = MONDAY + 4 * 86400 + 22 * 3600 + 30 * 60;
        assert_eq!(c.next_after(friday), Some(friday + 3 * 86400));
    }

    #[test]
    fn calendar_forms_parse_and_nonsense_is_refused() {
        for ok in [
            "hourly",
            "daily",
            "weekly",
            "4h",
            "*:15",
            "02:00",
            "sat,sun 03:15,15:15",
            "sat..mon 01:00",
        ] {
            assert!(Calendar::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "tomorrow",
            "25:00",
            "02:60",
            "mon..xyz 01:00",
            "0h",
            "daily 2",
            "a b c",
        ] {
            assert!(Calendar::parse(bad).is_err(), "{bad}");
        }
        let w = Calendar::parse("sat..mon 01:00").unwrap();
        assert_eq!(w.days, [true, false, false, false, false, true, true]);
    }

    proptest! {
        #[test]
        fn calendar_next_is_the_first_matching_minute_after(
            t in 0i64..4_000_000_000,
            spec in prop::sample::select(vec!["hourly", "daily 02:00", "mon..fri 22:30", "*:15", "sat,sun 03:15,15:15", "6h", "weekly"]),
        ) {
            let c = Calendar::parse(spec).unwrap();
            let n = c.next_after(t).unwrap();
            prop_assert!(n > t);
            prop_assert!(c.matches(n));
            prop_assert_eq!(n % 60, 0);
            // nothing scheduled in between
            let mut m = t.div_euclid(60) * 60 + 60;
            while m < n {
                prop_assert!(!c.matches(m));
                m += 60;
            }
        }
    }
}
