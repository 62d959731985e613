//! The card as NVML sees it, without a CUDA context: memory in use by every process and by each,
//! for planning on a desktop GPU that other programs share, and a telemetry sample (utilization,
//! memory, temperature, power, clocks, throttle reasons) that a run takes about once a second.
//! `libnvidia-ml` is loaded at run time (nvml-wrapper), once per process; where it is missing
//! every query answers `None` and the binary still runs.
//!
//! A sample is read raw ([`RawSample`]: NVML's own units, each field `None` where the card does
//! not report it) and turned into [`GpuSample`] by a pure function, so the units and the throttle
//! reasons are tested on recorded samples without a GPU.
//!
//! CUDA and NVML number the GPUs differently (`CUDA_VISIBLE_DEVICES`, PCI order), so a card is
//! named by its PCI bus id, which both report.

use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use serde::{Deserialize, Serialize};

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| Nvml::init().ok()).as_ref()
}

/// Device memory of one card, by NVML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CardMemory {
    pub total_bytes: u64,
    /// In use by every process and by the driver itself.
    pub used_bytes: u64,
    /// This process's own use (its CUDA context, modules and buffers), when the driver reports
    /// per-process memory (not in every container or under WDDM).
    pub ours_bytes: Option<u64>,
}

impl CardMemory {
    /// In use by everything but this process: other programs and the driver's reservation.
    pub fn others_bytes(&self) -> u64 {
        self.used_bytes.saturating_sub(self.ours_bytes.unwrap_or(0))
    }
}

/// The memory of the card at `pci_bus_id` (`0000:41:00.0`, as CUDA's
/// `CU_DEVICE_ATTRIBUTE_PCI_*` give it), or `None` without NVML.
pub fn card_memory(pci_bus_id: &str) -> Option<CardMemory> {
    let dev = nvml()?.device_by_pci_bus_id(pci_bus_id).ok()?;
    let info = dev.memory_info().ok()?;
    Some(CardMemory { total_bytes: info.total, used_bytes: info.used, ours_bytes: ours_bytes(&dev) })
}

/// This process's device memory on `dev`, when the driver reports per-process memory.
fn ours_bytes(dev: &nvml_wrapper::Device<'_>) -> Option<u64> {
    let me = std::process::id();
    dev.running_compute_processes().ok().and_then(|ps| {
        ps.into_iter().find(|p| p.pid == me).and_then(|p| match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        })
    })
}

/// One telemetry reading as NVML gives it: milliwatts, MHz, percent, the throttle-reason bits.
/// Each field is `None` where the card or driver does not report it (a laptop GPU has no power
/// reading; a container may hide per-process memory).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawSample {
    pub memory_total: u64,
    pub memory_used: u64,
    pub memory_ours: Option<u64>,
    pub utilization_gpu: Option<u32>,
    pub utilization_memory: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_mw: Option<u32>,
    pub power_limit_mw: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub sm_clock_max_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// `nvmlClocksThrottleReason*` bits (`ThrottleReasons`).
    pub throttle_reasons: Option<u64>,
}

/// Read one sample of the card at `pci_bus_id`; `None` without NVML or the card.
pub fn sample(pci_bus_id: &str) -> Option<RawSample> {
    let dev = nvml()?.device_by_pci_bus_id(pci_bus_id).ok()?;
    let mem = dev.memory_info().ok()?;
    let util = dev.utilization_rates().ok();
    Some(RawSample {
        memory_total: mem.total,
        memory_used: mem.used,
        memory_ours: ours_bytes(&dev),
        utilization_gpu: util.as_ref().map(|u| u.gpu),
        utilization_memory: util.as_ref().map(|u| u.memory),
        temperature_c: dev.temperature(TemperatureSensor::Gpu).ok(),
        power_mw: dev.power_usage().ok(),
        power_limit_mw: dev.enforced_power_limit().ok(),
        sm_clock_mhz: dev.clock_info(Clock::SM).ok(),
        sm_clock_max_mhz: dev.max_clock_info(Clock::SM).ok(),
        memory_clock_mhz: dev.clock_info(Clock::Memory).ok(),
        throttle_reasons: dev.current_throttle_reasons().ok().map(|r| r.bits()),
    })
}

/// Why the card is slowing its clocks down, in the terms a person acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    /// Too hot: the driver's or the hardware's thermal slowdown.
    pub thermal: bool,
    /// At its power limit (software power cap) or braked by the power supply.
    pub power: bool,
    /// The hardware's own slowdown (temperature or power draw; NVML does not say which).
    pub hardware: bool,
}

impl Throttle {
    pub fn from_bits(bits: u64) -> Self {
        let r = ThrottleReasons::from_bits_truncate(bits);
        Throttle {
            thermal: r.intersects(ThrottleReasons::SW_THERMAL_SLOWDOWN | ThrottleReasons::HW_THERMAL_SLOWDOWN),
            power: r.intersects(ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN),
            hardware: r.contains(ThrottleReasons::HW_SLOWDOWN),
        }
    }

    pub fn any(self) -> bool {
        self.thermal || self.power || self.hardware
    }
}

/// One telemetry point as the studio plots it and the throttle warning reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    /// Seconds since the run started.
    pub elapsed_s: f64,
    pub utilization_pct: Option<f64>,
    pub memory_utilization_pct: Option<f64>,
    pub memory_total_bytes: u64,
    /// Ours (this process), when the driver reports it.
    pub memory_ours_bytes: Option<u64>,
    /// Everything else in use on the card: other processes and the driver (all of it in use when
    /// ours is unknown).
    pub memory_others_bytes: u64,
    pub temperature_c: Option<f64>,
    pub power_w: Option<f64>,
    pub power_limit_w: Option<f64>,
    pub sm_clock_mhz: Option<f64>,
    pub sm_clock_max_mhz: Option<f64>,
    pub memory_clock_mhz: Option<f64>,
    pub throttle: Throttle,
}

impl GpuSample {
    /// NVML's units into the plots' (watts, MHz as floats), at `elapsed_s` into the run.
    pub fn from_raw(raw: &RawSample, elapsed_s: f64) -> Self {
        let f = |v: Option<u32>| v.map(f64::from);
        GpuSample {
            elapsed_s,
            utilization_pct: f(raw.utilization_gpu),
            memory_utilization_pct: f(raw.utilization_memory),
            memory_total_bytes: raw.memory_total,
            memory_ours_bytes: raw.memory_ours,
            memory_others_bytes: raw.memory_used.saturating_sub(raw.memory_ours.unwrap_or(0)),
            temperature_c: f(raw.temperature_c),
            power_w: raw.power_mw.map(|mw| mw as f64 / 1000.0),
            power_limit_w: raw.power_limit_mw.map(|mw| mw as f64 / 1000.0),
            sm_clock_mhz: f(raw.sm_clock_mhz),
            sm_clock_max_mhz: f(raw.sm_clock_max_mhz),
            memory_clock_mhz: f(raw.memory_clock_mhz),
            throttle: raw.throttle_reasons.map(Throttle::from_bits).unwrap_or_default(),
        }
    }
}

/// Whether NVML could be loaded (a driver is installed).
pub fn available() -> bool {
    nvml().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_units_become_the_plots_units() {
        let raw = RawSample {
            memory_total: 80 << 30,
            memory_used: 30 << 30,
            memory_ours: Some(20 << 30),
            utilization_gpu: Some(97),
            power_mw: Some(612_345),
            power_limit_mw: Some(700_000),
            sm_clock_mhz: Some(1755),
            throttle_reasons: Some(ThrottleReasons::SW_POWER_CAP.bits()),
            ..Default::default()
        };
        let s = GpuSample::from_raw(&raw, 3.0);
        assert_eq!((s.memory_ours_bytes, s.memory_others_bytes), (Some(20 << 30), 10 << 30));
        assert_eq!((s.power_w, s.power_limit_w, s.utilization_pct), (Some(612.345), Some(700.0), Some(97.0)));
        assert_eq!(s.throttle, Throttle { power: true, ..Default::default() });
        assert_eq!(s.temperature_c, None, "not reported stays unknown, not zero");
        let hidden = GpuSample::from_raw(&RawSample { memory_ours: None, ..raw }, 0.0);
        assert_eq!(hidden.memory_others_bytes, 30 << 30, "without per-process memory, all of it is counted as in use");
    }

    #[test]
    fn throttle_reasons_are_sorted_into_what_a_person_acts_on() {
        let t = |r: ThrottleReasons| Throttle::from_bits(r.bits());
        assert_eq!(t(ThrottleReasons::GPU_IDLE | ThrottleReasons::APPLICATIONS_CLOCKS_SETTING), Throttle::default());
        assert!(t(ThrottleReasons::SW_THERMAL_SLOWDOWN).thermal && t(ThrottleReasons::HW_THERMAL_SLOWDOWN).thermal);
        assert!(t(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN).power);
        let hw = t(ThrottleReasons::HW_SLOWDOWN);
        assert!(hw.hardware && !hw.thermal && !hw.power && hw.any());
    }
}
