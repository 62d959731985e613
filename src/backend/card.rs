//! What a GPU allows, as the kernels and the memory plan need it, and the profiles of the cards
//! our users train on.
//!
//! Every kernel decision of the CUDA backend (which PTX it loads, which attention variant and tile
//! shape it runs, how much shared memory it asks for) is a function of [`CardLimits`] alone. The
//! backend reads them from the device, or takes them from a profile (`--card NAME`,
//! `TUNESTUDIO_CARD=NAME`): then an H100/H200 decides exactly as an RTX 4090 or an L4 would, and its
//! allocator refuses to go past the profile's memory, so a run that would not fit the real card
//! fails the same way under its profile. The memory plan sizes its workspace terms from the same
//! limits, so `plan --card NAME` needs no GPU.
//!
//! The per-architecture limits come from NVIDIA's table "Technical Specifications per Compute
//! Capability" in the CUDA C++ Programming Guide (shared memory per SM and the opt-in maximum per
//! block, which is the per-SM figure less the 1 KB the driver reserves per block; 64 K 32-bit
//! registers per SM; resident threads per SM). The multiprocessor counts are those of the named
//! products (NVIDIA's product specifications); the memory is what the driver reports as the card's
//! total (`nvidia-smi`), which is a little under the marketed size.

use serde::Serialize;

/// The limits of one card that kernel choice and planning read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardLimits {
    /// The device's name, or the profile's product name.
    pub name: String,
    /// The profile's key when these limits come from a profile rather than the device.
    pub profile: Option<&'static str>,
    pub compute_capability: (u32, u32),
    pub sm_count: u32,
    /// Dynamic shared memory one block may opt into (`cudaDevAttrMaxSharedMemoryPerBlockOptin`).
    pub smem_per_block_optin: u32,
    pub smem_per_sm: u32,
    pub regs_per_sm: u32,
    pub max_threads_per_sm: u32,
    /// Device memory the driver reports as the card's total.
    pub memory_bytes: u64,
}

/// Which embedded PTX a card loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PtxTarget {
    /// `-arch=sm_90`: Hopper only.
    Sm90,
    /// `-arch=compute_80`: the driver compiles it for any card of compute capability 8.0 or newer.
    Sm80,
}

impl PtxTarget {
    pub fn name(self) -> &'static str {
        match self {
            PtxTarget::Sm90 => "sm_90",
            PtxTarget::Sm80 => "compute_80",
        }
    }
}

/// Why a card cannot run the CUDA engine, in words for the user (one line, says what to do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRefusal {
    pub card: String,
    pub reason: String,
}

impl std::fmt::Display for CardRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.card, self.reason)
    }
}

/// Per-architecture limits from NVIDIA's compute-capability table.
struct ArchLimits {
    smem_per_sm_kib: u32,
    max_threads_per_sm: u32,
}

fn arch_limits(cc: (u32, u32)) -> ArchLimits {
    // CUDA C++ Programming Guide, "Technical Specifications per Compute Capability":
    // shared memory per SM 164 KB (8.0, 8.7), 100 KB (8.6, 8.9, 12.0), 228 KB (9.0, 10.0);
    // resident threads per SM 2048 (8.0, 9.0, 10.0), 1536 (8.6, 8.9, 12.0). Older cards are listed
    // only to refuse them by name: 96 KB / 2048 (7.0), 64 KB / 1024 (7.5).
    let (smem_per_sm_kib, max_threads_per_sm) = match cc {
        (8, 0) | (8, 7) => (164, 2048),
        (8, 6) | (8, 9) | (12, _) => (100, 1536),
        (9, 0) | (10, _) => (228, 2048),
        (7, 0) | (7, 2) => (96, 2048),
        (7, 5) => (64, 1024),
        // An architecture newer than this table: assume the smallest per-block budget of the
        // recent ones, so every kernel chosen for it fits.
        _ => (100, 1536),
    };
    ArchLimits { smem_per_sm_kib, max_threads_per_sm }
}

/// The driver keeps 1 KB of every SM's shared memory per resident block (compute capability 8.0
/// and newer), so one block may opt into the per-SM amount less that.
const RESERVED_SMEM_PER_BLOCK: u32 = 1024;

impl CardLimits {
    /// Limits of a card of compute capability `cc` with `sm_count` multiprocessors and
    /// `memory_bytes`, from NVIDIA's table.
    pub fn from_table(name: &str, cc: (u32, u32), sm_count: u32, memory_bytes: u64) -> Self {
        let a = arch_limits(cc);
        let smem_per_sm = a.smem_per_sm_kib * 1024;
        CardLimits {
            name: name.to_string(),
            profile: None,
            compute_capability: cc,
            sm_count,
            smem_per_block_optin: smem_per_sm - RESERVED_SMEM_PER_BLOCK,
            smem_per_sm,
            regs_per_sm: 64 * 1024,
            max_threads_per_sm: a.max_threads_per_sm,
            memory_bytes,
        }
    }

    /// The PTX this card loads: Hopper's own build on compute capability 9.x, the compute_80
    /// build (compiled by the driver at load) on everything else.
    pub fn ptx_target(&self) -> PtxTarget {
        if self.compute_capability.0 == 9 { PtxTarget::Sm90 } else { PtxTarget::Sm80 }
    }

    /// `Err` with the reason when the CUDA engine cannot run on this card at all.
    pub fn check_supported(&self) -> Result<(), CardRefusal> {
        let (major, minor) = self.compute_capability;
        if major < 8 {
            return Err(CardRefusal {
                card: self.describe(),
                reason: format!(
                    "compute capability {major}.{minor} has no bf16 tensor cores, which the CUDA engine needs \
                     (Ampere, compute capability 8.0, or newer: RTX 30/40/50, A10, L4, L40S, A6000, A100, H100); \
                     train on the CPU (device = \"cpu\") or on a newer card"
                ),
            });
        }
        Ok(())
    }

    /// "NVIDIA GeForce RTX 4090 (profile rtx4090, compute capability 8.9, 24 GiB)".
    pub fn describe(&self) -> String {
        let (major, minor) = self.compute_capability;
        let gib = self.memory_bytes as f64 / (1u64 << 30) as f64;
        match self.profile {
            Some(p) => format!("{} (profile {p}, compute capability {major}.{minor}, {gib:.0} GiB)", self.name),
            None => format!("{} (compute capability {major}.{minor}, {gib:.0} GiB)", self.name),
        }
    }
}

/// How fast a card is, from its datasheet: what the step-time prediction
/// (`crate::engine::cost`) scales its calibrated efficiencies by. Not a limit: no kernel decision
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CardSpeed {
    /// Dense bf16 tensor-core rate with f32 accumulation (what our GEMMs and attention use), in
    /// TFLOP/s at boost clock. GeForce cards run f32 accumulation at half their f16-accumulate
    /// rate; the figure is the f32-accumulate one, without sparsity.
    pub bf16_tflops: f64,
    /// Device memory bandwidth, GB/s.
    pub memory_gb_s: f64,
    /// The host link's peak one-way bandwidth, GB/s (PCIe 4.0 x16: 32; PCIe 5.0 x16: 64), which
    /// offloaded layer inputs cross.
    pub host_link_gb_s: f64,
}

/// A card users train on, as the backend, the plan and the studio's card picker see it. Two
/// profiles are the same when their keys are (the speeds are f64, so equality is by key).
#[derive(Debug, Clone, Copy)]
pub struct CardProfile {
    /// What `--card` and `TUNESTUDIO_CARD` take.
    pub key: &'static str,
    pub name: &'static str,
    pub compute_capability: (u32, u32),
    pub sm_count: u32,
    /// The total the driver reports, in MiB.
    pub memory_mib: u64,
    pub speed: CardSpeed,
}

impl PartialEq for CardProfile {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for CardProfile {}

impl CardProfile {
    pub fn limits(&self) -> CardLimits {
        let mut l = CardLimits::from_table(self.name, self.compute_capability, self.sm_count, self.memory_mib << 20);
        l.profile = Some(self.key);
        l
    }

    /// Whether the CUDA engine runs on this card.
    pub fn supported(&self) -> bool {
        self.limits().check_supported().is_ok()
    }
}

const fn profile(
    key: &'static str,
    name: &'static str,
    cc: (u32, u32),
    sm_count: u32,
    memory_mib: u64,
    (bf16_tflops, memory_gb_s, host_link_gb_s): (f64, f64, f64),
) -> CardProfile {
    CardProfile { key, name, compute_capability: cc, sm_count, memory_mib, speed: CardSpeed { bf16_tflops, memory_gb_s, host_link_gb_s } }
}

/// The profiles, smallest memory first within each generation. The last three cannot run the
/// engine; they are here so that choosing one says why instead of planning a run that cannot start.
/// Speeds (dense bf16 TFLOP/s with f32 accumulation, memory GB/s, host link GB/s) are the
/// products' datasheet figures (NVIDIA's product pages and architecture whitepapers).
pub const PROFILES: &[CardProfile] = &[
    profile("rtx3060", "NVIDIA GeForce RTX 3060", (8, 6), 28, 12_288, (25.6, 360.0, 32.0)),
    profile("rtx3090", "NVIDIA GeForce RTX 3090", (8, 6), 82, 24_576, (35.6, 936.0, 32.0)),
    profile("a10", "NVIDIA A10", (8, 6), 72, 23_028, (125.0, 600.0, 32.0)),
    profile("a6000", "NVIDIA RTX A6000", (8, 6), 84, 49_140, (154.8, 768.0, 32.0)),
    profile("rtx4090", "NVIDIA GeForce RTX 4090", (8, 9), 128, 24_564, (82.6, 1008.0, 32.0)),
    profile("l4", "NVIDIA L4", (8, 9), 58, 23_034, (121.0, 300.0, 32.0)),
    profile("l40s", "NVIDIA L40S", (8, 9), 142, 46_068, (362.0, 864.0, 32.0)),
    profile("rtx5090", "NVIDIA GeForce RTX 5090", (12, 0), 170, 32_607, (209.5, 1792.0, 64.0)),
    profile("a100-40", "NVIDIA A100-SXM4-40GB", (8, 0), 108, 40_960, (312.0, 1555.0, 32.0)),
    profile("a100-80", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 81_920, (312.0, 2039.0, 32.0)),
    profile("h100-80", "NVIDIA H100 80GB HBM3", (9, 0), 132, 81_559, (989.0, 3350.0, 64.0)),
    profile("h200", "NVIDIA H200", (9, 0), 132, 143_771, (989.0, 4800.0, 64.0)),
    profile("t4", "Tesla T4", (7, 5), 40, 15_360, (65.0, 320.0, 16.0)),
    profile("v100-32", "Tesla V100-SXM2-32GB", (7, 0), 80, 32_768, (125.0, 900.0, 16.0)),
    profile("rtx2080ti", "NVIDIA GeForce RTX 2080 Ti", (7, 5), 68, 11_264, (26.9, 616.0, 16.0)),
];

impl CardLimits {
    /// This card's speed and where it comes from: its profile's datasheet figures (under
    /// `--card`, or a device whose name is a profile's); for another device, the profile of the
    /// same compute capability with the nearest multiprocessor count, its compute rate scaled by
    /// the count ("estimated from ..."). `None` for an architecture no profile has.
    pub fn speed(&self) -> Option<(CardSpeed, String)> {
        let own = match self.profile {
            Some(key) => PROFILES.iter().find(|p| p.key == key),
            None => PROFILES.iter().find(|p| p.name.eq_ignore_ascii_case(self.name.trim())),
        };
        if let Some(p) = own {
            return Some((p.speed, format!("{} datasheet", p.name)));
        }
        // GeForce cards accumulate in f32 at half the rate of the professional ones of the same
        // architecture, so a GeForce card is estimated from a GeForce profile when there is one.
        let geforce = |name: &str| name.contains("GeForce");
        let near = PROFILES
            .iter()
            .filter(|p| p.compute_capability == self.compute_capability)
            .min_by_key(|p| (geforce(p.name) != geforce(&self.name), p.sm_count.abs_diff(self.sm_count)))?;
        let scale = self.sm_count as f64 / near.sm_count as f64;
        let speed = CardSpeed { bf16_tflops: near.speed.bf16_tflops * scale, ..near.speed };
        Some((speed, format!("estimated from the {} by multiprocessor count", near.name)))
    }
}

/// The environment variable that makes a CUDA backend (and the plan) decide as a profiled card.
pub const CARD_ENV: &str = "TUNESTUDIO_CARD";

/// The profile named `key` (case and surrounding blanks ignored), or an error listing the keys.
pub fn profile_named(key: &str) -> Result<&'static CardProfile, String> {
    let k = key.trim().to_ascii_lowercase();
    PROFILES.iter().find(|p| p.key == k).ok_or_else(|| {
        let keys: Vec<&str> = PROFILES.iter().map(|p| p.key).collect();
        format!("unknown card profile {key:?}: use one of {}", keys.join(", "))
    })
}

/// The profile `TUNESTUDIO_CARD` names, if set and not empty.
pub fn profile_from_env() -> Result<Option<&'static CardProfile>, String> {
    match std::env::var(CARD_ENV) {
        Ok(v) if !v.trim().is_empty() => profile_named(&v).map(Some).map_err(|e| format!("{CARD_ENV}: {e}")),
        _ => Ok(None),
    }
}

/// The limits of a profile, shrunk to the real device where the device allows less (a profile
/// never lets the backend ask the real driver for more than it grants).
pub fn emulate(profile: &CardProfile, device: &CardLimits) -> CardLimits {
    let mut l = profile.limits();
    l.smem_per_block_optin = l.smem_per_block_optin.min(device.smem_per_block_optin);
    l.smem_per_sm = l.smem_per_sm.min(device.smem_per_sm);
    l.memory_bytes = l.memory_bytes.min(device.memory_bytes);
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workstation_cards_allow_99_kib_per_block() {
        for key in ["rtx3060", "rtx3090", "a10", "a6000", "rtx4090", "l4", "l40s", "rtx5090"] {
            let l = profile_named(key).unwrap().limits();
            assert_eq!(l.smem_per_block_optin, 99 * 1024, "{key}");
            assert_eq!(l.ptx_target(), PtxTarget::Sm80, "{key}");
        }
        assert_eq!(profile_named("a100-80").unwrap().limits().smem_per_block_optin, 163 * 1024);
        let h100 = profile_named("H100-80 ").unwrap().limits();
        assert_eq!((h100.smem_per_block_optin, h100.ptx_target()), (227 * 1024, PtxTarget::Sm90));
    }

    #[test]
    fn cards_without_bf16_tensor_cores_are_refused_by_name() {
        let t4 = profile_named("t4").unwrap();
        assert!(!t4.supported());
        let why = t4.limits().check_supported().unwrap_err().to_string();
        assert!(why.contains("Tesla T4") && why.contains("7.5") && why.contains("cpu"), "{why}");
        assert!(PROFILES.iter().filter(|p| p.compute_capability.0 >= 8).all(|p| p.supported()));
    }

    #[test]
    fn unknown_profile_lists_the_known_ones() {
        let e = profile_named("rtx9999").unwrap_err();
        assert!(e.contains("rtx4090") && e.contains("a100-40"), "{e}");
    }

    #[test]
    fn emulation_never_exceeds_the_real_device() {
        let small_real = CardLimits::from_table("test", (8, 6), 10, 8 << 30);
        let l = emulate(profile_named("h100-80").unwrap(), &small_real);
        assert_eq!(l.smem_per_block_optin, 99 * 1024);
        assert_eq!(l.memory_bytes, 8 << 30);
        assert_eq!(l.compute_capability, (9, 0));
    }
}
