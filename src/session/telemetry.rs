//! GPU telemetry during a CUDA run: a thread of the session reads the card through NVML about
//! once a second (`backend::nvml::sample`), sends each reading as `Event::Gpu`, and warns in the
//! run's log when the card throttles for temperature or power, once per cause per run, after the
//! cause has lasted long enough to cost time (a power cap that touches the clocks for a moment is
//! how boost clocks work, not news).
//!
//! [`ThrottleWatch`] is the warning logic alone, fed with samples: the tests replay recorded ones.

use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};

use super::Event;
use crate::backend::nvml::{self, GpuSample};

/// How often the card is read.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// A thermal or hardware slowdown is worth a warning once it has lasted this long.
const SUSTAINED_HEAT_S: f64 = 3.0;
/// The software power cap comes and goes with the load; warn when it holds the clocks down longer.
const SUSTAINED_POWER_S: f64 = 10.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Thermal,
    Power,
    Hardware,
}

const CAUSES: [Cause; 3] = [Cause::Thermal, Cause::Power, Cause::Hardware];

impl Cause {
    fn active(self, s: &GpuSample) -> bool {
        match self {
            Cause::Thermal => s.throttle.thermal,
            Cause::Power => s.throttle.power,
            Cause::Hardware => s.throttle.hardware,
        }
    }

    fn sustained_s(self) -> f64 {
        if self == Cause::Power { SUSTAINED_POWER_S } else { SUSTAINED_HEAT_S }
    }
}

/// Turns a run's samples into at most one warning per cause.
#[derive(Debug, Default)]
pub struct ThrottleWatch {
    /// When each cause (in `CAUSES` order) started, while it lasts.
    since: [Option<f64>; 3],
    warned: [bool; 3],
}

impl ThrottleWatch {
    /// The warnings this sample raises (usually none): a cause that has now lasted long enough
    /// and was not warned about before in this run.
    pub fn observe(&mut self, s: &GpuSample) -> Vec<String> {
        let mut out = Vec::new();
        for (i, cause) in CAUSES.into_iter().enumerate() {
            if !cause.active(s) {
                self.since[i] = None;
                continue;
            }
            let since = *self.since[i].get_or_insert(s.elapsed_s);
            let lasted = s.elapsed_s - since;
            if !self.warned[i] && lasted >= cause.sustained_s() {
                self.warned[i] = true;
                out.push(warning(cause, s, lasted));
            }
        }
        out
    }
}

fn clocks(s: &GpuSample) -> String {
    match (s.sm_clock_mhz, s.sm_clock_max_mhz) {
        (Some(c), Some(m)) => format!("SM clock {c:.0} of {m:.0} MHz"),
        (Some(c), None) => format!("SM clock {c:.0} MHz"),
        _ => "clocks lowered".into(),
    }
}

/// One line: what the card is doing, for how long, what it costs, what to do.
fn warning(cause: Cause, s: &GpuSample, lasted: f64) -> String {
    let temp = s.temperature_c.map(|t| format!("{t:.0} °C, ")).unwrap_or_default();
    match cause {
        Cause::Thermal => format!(
            "warning: the GPU is throttling for temperature ({temp}{}) for {lasted:.0} s: steps run slower; check the card's cooling and airflow",
            clocks(s)
        ),
        Cause::Power => {
            let power = match (s.power_w, s.power_limit_w) {
                (Some(p), Some(l)) => format!("{p:.0} of {l:.0} W, "),
                _ => String::new(),
            };
            format!(
                "warning: the GPU is throttling at its power limit ({power}{}) for {lasted:.0} s: steps run below the card's top clocks; a higher power limit (nvidia-smi -pl, where allowed) or a cooler card helps",
                clocks(s)
            )
        }
        Cause::Hardware => format!(
            "warning: the GPU's hardware slowdown is engaged ({temp}{}) for {lasted:.0} s, for temperature or power draw: steps run far slower; check the card's cooling and its power supply",
            clocks(s)
        ),
    }
}

/// The sampling thread of one run; dropping it stops and joins the thread.
pub struct Sampler {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    /// Start reading the card at `pci_bus_id` every [`INTERVAL`], with times counted from
    /// `started`; `None` when NVML cannot read it (no driver library, a card it does not list).
    pub fn start(pci_bus_id: String, started: Instant, events: Sender<Event>) -> Option<Sampler> {
        nvml::sample(&pci_bus_id)?;
        let (stop, stopped) = bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("tunestudio-telemetry".into())
            .spawn(move || {
                let mut watch = ThrottleWatch::default();
                // Until the session drops its end of `stop` (or the owner stops listening).
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
                    let Some(raw) = nvml::sample(&pci_bus_id) else { continue };
                    let s = GpuSample::from_raw(&raw, started.elapsed().as_secs_f64());
                    for w in watch.observe(&s) {
                        if events.send(Event::Log(w)).is_err() {
                            return;
                        }
                    }
                    if events.send(Event::Gpu(s)).is_err() {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Sampler { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nvml::{RawSample, Throttle};

    /// A recorded-style trace: `(seconds, temperature, SM clock, throttle bits)` per second.
    fn trace(points: &[(f64, u32, u32, u64)]) -> Vec<GpuSample> {
        points
            .iter()
            .map(|&(t, temp, clock, bits)| {
                let raw = RawSample {
                    memory_total: 24 << 30,
                    memory_used: 20 << 30,
                    temperature_c: Some(temp),
                    power_mw: Some(449_000),
                    power_limit_mw: Some(450_000),
                    sm_clock_mhz: Some(clock),
                    sm_clock_max_mhz: Some(2520),
                    throttle_reasons: Some(bits),
                    ..Default::default()
                };
                GpuSample::from_raw(&raw, t)
            })
            .collect()
    }

    const SW_POWER_CAP: u64 = 0x4;
    const SW_THERMAL: u64 = 0x20;

    #[test]
    fn a_sustained_thermal_slowdown_is_warned_once() {
        // Warms up, throttles for 2 s (a blip), recovers, then throttles for good.
        let mut points = vec![(0.0, 70, 2520, 0), (1.0, 84, 2300, SW_THERMAL), (2.0, 85, 2200, SW_THERMAL), (3.0, 80, 2520, 0)];
        points.extend((4..20).map(|t| (t as f64, 88, 1900, SW_THERMAL)));
        let mut w = ThrottleWatch::default();
        let warned: Vec<(f64, String)> =
            trace(&points).iter().flat_map(|s| w.observe(s).into_iter().map(move |m| (s.elapsed_s, m))).collect();
        assert_eq!(warned.len(), 1, "{warned:?}");
        let (at, line) = &warned[0];
        assert_eq!(*at, 7.0, "3 s after the throttling that lasted began (at 4 s), not the blip at 1 s");
        assert!(line.contains("temperature (88 °C, SM clock 1900 of 2520 MHz) for 3 s") && line.contains("cooling"), "{line}");
    }

    #[test]
    fn the_power_cap_needs_to_hold_longer_and_causes_are_told_apart() {
        let mut w = ThrottleWatch::default();
        let mut points: Vec<_> = (0..9).map(|t| (t as f64, 75, 2400, SW_POWER_CAP)).collect();
        points.push((9.0, 76, 2520, 0));
        assert!(trace(&points).iter().all(|s| w.observe(s).is_empty()), "9 s at the power cap: boost clocks at work");
        let long: Vec<_> = (10..40).map(|t| (t as f64, 76, 2100, SW_POWER_CAP)).collect();
        let lines: Vec<String> = trace(&long).iter().flat_map(|s| w.observe(s)).collect();
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("power limit (449 of 450 W, SM clock 2100 of 2520 MHz) for 10 s"), "{}", lines[0]);
        // Heat on top of the power cap is a second, different warning.
        let hot: Vec<_> = (40..45).map(|t| (t as f64, 90, 1800, SW_POWER_CAP | SW_THERMAL)).collect();
        let lines: Vec<String> = trace(&hot).iter().flat_map(|s| w.observe(s)).collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("temperature"));
    }

    #[test]
    fn a_card_that_reports_little_still_gets_a_readable_warning() {
        let s = GpuSample { elapsed_s: 5.0, throttle: Throttle { hardware: true, ..Default::default() }, ..Default::default() };
        let mut w = ThrottleWatch::default();
        assert!(w.observe(&GpuSample { elapsed_s: 0.0, ..s.clone() }).is_empty());
        let lines = w.observe(&s);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("hardware slowdown is engaged (clocks lowered) for 5 s"), "{}", lines[0]);
    }
}
