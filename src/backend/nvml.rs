//! The card as NVML sees it, without a CUDA context: memory in use by every process and by each,
//! for planning on a desktop GPU that other programs share. `libnvidia-ml` is loaded at run time
//! (nvml-wrapper), once per process; where it is missing every query answers `None` and the
//! binary still runs.
//!
//! CUDA and NVML number the GPUs differently (`CUDA_VISIBLE_DEVICES`, PCI order), so a card is
//! named by its PCI bus id, which both report.

use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

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
    let me = std::process::id();
    let ours = dev.running_compute_processes().ok().and_then(|ps| {
        ps.into_iter().find(|p| p.pid == me).and_then(|p| match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        })
    });
    Some(CardMemory { total_bytes: info.total, used_bytes: info.used, ours_bytes: ours })
}

/// Whether NVML could be loaded (a driver is installed).
pub fn available() -> bool {
    nvml().is_some()
}
