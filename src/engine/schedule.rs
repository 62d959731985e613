//! Learning-rate schedules with warm-up, as `transformers` defines them: the update with 0-based
//! index `k` uses `lr · λ(k)`, so the first update of a warm-up runs at lr 0.

use crate::config::{ScheduleConfig, ScheduleKind};

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn new(cfg: &ScheduleConfig, base_lr: f64, total_steps: u64) -> Self {
        let warmup_steps = if cfg.warmup_ratio > 0.0 { (cfg.warmup_ratio * total_steps as f64).ceil() as u64 } else { cfg.warmup_steps };
        Schedule { kind: cfg.kind, base_lr, warmup_steps, total_steps }
    }

    /// The learning rate of the update with 0-based index `step`.
    pub fn lr(&self, step: u64) -> f64 {
        let (k, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return self.base_lr * k / w.max(1.0);
        }
        let factor = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - k) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                // Past its span (a run extended without re-planning) the schedule stays at its end.
                let progress = ((k - w) / (t - w).max(1.0)).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, total: u64) -> Schedule {
        Schedule::new(&ScheduleConfig { kind, warmup_steps: warmup, warmup_ratio: 0.0, steps: None }, 1.0, total)
    }

    #[test]
    fn linear_matches_transformers() {
        let s = sched(ScheduleKind::Linear, 5, 60);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(1) - 0.2).abs() < 1e-12);
        assert_eq!(s.lr(5), 1.0);
        assert!((s.lr(30) - 30.0 / 55.0).abs() < 1e-12);
        assert_eq!(s.lr(60), 0.0);
    }

    #[test]
    fn cosine_and_constant() {
        let s = sched(ScheduleKind::Cosine, 0, 10);
        assert_eq!(s.lr(0), 1.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!(s.lr(10).abs() < 1e-12);
        assert!(s.lr(15).abs() < 1e-12, "past its span the cosine stays at 0");
        let c = sched(ScheduleKind::Constant, 2, 10);
        assert_eq!(c.lr(1), 0.5);
        assert_eq!(c.lr(9), 1.0);
    }

    #[test]
    fn warmup_ratio_overrides_steps() {
        let s = Schedule::new(&ScheduleConfig { kind: ScheduleKind::Linear, warmup_steps: 5, warmup_ratio: 0.1, steps: None }, 1.0, 100);
        assert_eq!(s.warmup_steps, 10);
    }
}
