//! How many new onion circuits are let in per time window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A sliding window: at most `max` admissions in any `window`.
#[derive(Debug)]
pub struct CircuitWindow {
    max: usize,
    window: Duration,
    admitted: VecDeque<Instant>,
}

impl CircuitWindow {
    /// `max` 0 admits nothing; a zero window admits everything.
    pub fn new(max: u32, window: Duration) -> Self {
        CircuitWindow { max: max as usize, window, admitted: VecDeque::new() }
    }

    /// Whether one more circuit may come in at `now` (and counts it if so).
    pub fn admit(&mut self, now: Instant) -> bool {
        if self.window.is_zero() {
            return true;
        }
        while let Some(first) = self.admitted.front() {
            if now.duration_since(*first) >= self.window {
                self.admitted.pop_front();
            } else {
                break;
            }
        }
        if self.admitted.len() >= self.max {
            return false;
        }
        self.admitted.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_limits_and_slides() {
        let start = Instant::now();
        let mut w = CircuitWindow::new(3, Duration::from_secs(10));
        assert!(w.admit(start));
        assert!(w.admit(start + Duration::from_secs(1)));
        assert!(w.admit(start + Duration::from_secs(2)));
        assert!(!w.admit(start + Duration::from_secs(3)), "fourth in the window is refused");
        assert!(!w.admit(start + Duration::from_secs(9)));
        assert!(w.admit(start + Duration::from_secs(10)), "the first one left the window");
        assert!(!w.admit(start + Duration::from_secs(10)));
        assert!(w.admit(start + Duration::from_secs(11)));
    }

    #[test]
    fn zero_max_refuses_zero_window_admits() {
        let now = Instant::now();
        assert!(!CircuitWindow::new(0, Duration::from_secs(1)).admit(now));
        let mut open = CircuitWindow::new(0, Duration::ZERO);
        assert!((0..100).all(|_| open.admit(now)));
    }
}
