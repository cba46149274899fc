//! Bandwidth limits: how fast the agent may send, by time of day.
//!
//! The limit applies to the bytes the agent writes on its control channel
//! (frames, before TLS). A token bucket in the writer task holds writes back;
//! because the channel into that task is bounded, the whole scan pipeline
//! then slows to the limit instead of buffering. The schedule is shared and
//! can be replaced at run time (SIGHUP), and the limit in force is looked up
//! on every write, so a window that opens or closes takes effect at once.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// A weekday, Monday = 0.
pub type Weekday = u8;

/// A time-of-day window with its own limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight the window opens.
    pub start: u16,
    /// Minutes after midnight it closes (before `start`: it spans midnight).
    pub end: u16,
    /// Days it applies on (empty: every day), Monday = 0.
    pub days: Vec<Weekday>,
    /// Bytes per second while it is open (0: unlimited).
    pub limit: u64,
}

impl Window {
    fn contains(&self, day: Weekday, minute: u16) -> bool {
        let on_day = |d: Weekday| self.days.is_empty() || self.days.contains(&d);
        if self.start <= self.end {
            on_day(day) && minute >= self.start && minute < self.end
        } else {
            // Spans midnight: the part after midnight belongs to the day the
            // window opened.
            (on_day(day) && minute >= self.start) || (on_day((day + 6) % 7) && minute < self.end)
        }
    }
}

/// The limits in force, by time of day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Bytes per second outside every window (0: unlimited).
    pub default: u64,
    /// Windows, the first matching one wins.
    pub windows: Vec<Window>,
}

impl Schedule {
    /// The limit at a local day and minute of day; `None`: unlimited.
    pub fn limit_at(&self, day: Weekday, minute: u16) -> Option<u64> {
        let l = self
            .windows
            .iter()
            .find(|w| w.contains(day, minute))
            .map_or(self.default, |w| w.limit);
        (l > 0).then_some(l)
    }

    /// The limit now, in local time.
    pub fn limit_now(&self) -> Option<u64> {
        if self.default == 0 && self.windows.is_empty() {
            return None;
        }
        let (day, minute) = local_day_minute();
        self.limit_at(day, minute)
    }
}

/// Local weekday (Monday = 0) and minute of the day.
pub fn local_day_minute() -> (Weekday, u16) {
    // SAFETY: time(2) and localtime_r(3) with valid pointers to locals; tm
    // is plain data that localtime_r fills in.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return (0, 0);
        }
        (
            ((tm.tm_wday + 6) % 7) as Weekday,
            (tm.tm_hour * 60 + tm.tm_min) as u16,
        )
    }
}

/// Parses a rate such as `"50M"`, `"512K"`, `"1G"` or `"1000"` (bytes per
/// second; K, M, G are powers of 1024; `0` means unlimited).
pub fn parse_rate(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// Parses `"HH:MM"` into minutes after midnight.
pub fn parse_time(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Parses a weekday name (`mon` … `sun`, any case, three letters or more).
pub fn parse_day(s: &str) -> Option<Weekday> {
    let s = s.trim().to_ascii_lowercase();
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .iter()
        .position(|d| s.starts_with(d))
        .map(|p| p as Weekday)
}

/// A token bucket following a shared, replaceable schedule.
pub struct Throttle {
    schedule: Arc<RwLock<Schedule>>,
    tokens: f64,
    at: Instant,
}

impl Throttle {
    /// A throttle reading its limits from `schedule`.
    pub fn new(schedule: Arc<RwLock<Schedule>>) -> Self {
        Throttle {
            schedule,
            tokens: 0.0,
            at: Instant::now(),
        }
    }

    /// How long to wait before sending `bytes` under `limit` bytes per
    /// second; takes the tokens. Bursts are capped at a tenth of a second's
    /// worth (at least 64 KiB).
    pub fn delay_for(&mut self, bytes: usize, limit: Option<u64>, now: Instant) -> Duration {
        let Some(limit) = limit else {
            self.tokens = 0.0;
            self.at = now;
            return Duration::ZERO;
        };
        let rate = limit as f64;
        let burst = (rate / 10.0).max(65536.0);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst) - bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn consume(&mut self, bytes: usize) {
        let limit = self.schedule.read().map(|s| s.limit_now()).unwrap_or(None);
        let wait = self.delay_for(bytes, limit, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_times_and_days_parse() {
        assert_eq!(parse_rate("50M"), Some(50 << 20));
        assert_eq!(parse_rate("512k"), Some(512 << 10));
        assert_eq!(parse_rate("1000"), Some(1000));
        assert_eq!(parse_rate("fast"), None);
        assert_eq!(parse_time("08:30"), Some(510));
        assert_eq!(parse_time("24:00"), None);
        assert_eq!(parse_day("Friday"), Some(4));
        assert_eq!(parse_day("xyz"), None);
    }

    #[test]
    fn windows_pick_the_limit_including_across_midnight() {
        let s = Schedule {
            default: 100,
            windows: vec![
                Window {
                    start: 8 * 60,
                    end: 18 * 60,
                    days: vec![0, 1, 2, 3, 4],
                    limit: 10,
                },
                Window {
                    start: 22 * 60,
                    end: 6 * 60,
                    days: vec![4],
                    limit: 0,
                },
            ],
        };
        assert_eq!(s.limit_at(0, 9 * 60), Some(10), "weekday office hours");
        assert_eq!(s.limit_at(5, 9 * 60), Some(100), "Saturday: default");
        assert_eq!(s.limit_at(4, 23 * 60), None, "Friday night: unlimited");
        assert_eq!(
            s.limit_at(5, 3 * 60),
            None,
            "still Friday's window after midnight"
        );
        assert_eq!(
            s.limit_at(6, 3 * 60),
            Some(100),
            "Sunday early morning: default"
        );
        assert_eq!(Schedule::default().limit_now(), None);
    }

    #[test]
    fn the_bucket_holds_the_average_rate() {
        let schedule = Arc::new(RwLock::new(Schedule::default()));
        let mut t = Throttle::new(schedule);
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0u64;
        // 1 MiB/s, 64 KiB writes: after the initial burst, each write waits
        // 1/16 s; simulate the clock advancing by the waits.
        for _ in 0..64 {
            let wait = t.delay_for(65536, Some(1 << 20), now);
            now += wait;
            sent += 65536;
        }
        let secs = now.duration_since(start).as_secs_f64();
        let rate = sent as f64 / secs;
        assert!(
            (rate - (1 << 20) as f64).abs() / ((1 << 20) as f64) < 0.1,
            "rate {rate}"
        );
        assert_eq!(
            t.delay_for(1 << 30, None, now),
            Duration::ZERO,
            "unlimited never waits"
        );
    }
}
