//! The device layer on a real card: NVML telemetry read for real (and recorded, for the CPU tests'
//! fixtures), the plan target of an open backend, a memory cap the plan targets and the allocator
//! enforces, and a run under a cap reporting its target and its telemetry. Run on a GPU host with
//! `--ignored` (under a card profile too: `TUNESTUDIO_CARD=rtx4090`).
//!
//! `TUNESTUDIO_TELEMETRY_RECORD=FILE` writes the raw samples of the telemetry test to FILE as JSON
//! lines (`{"elapsed_s": …, "raw": RawSample}`).

use std::time::{Duration, Instant};

use tunestudio::backend::nvml::{self, GpuSample};
use tunestudio::backend::{Backend, DType};
use tunestudio::config::{ByteSize, DeviceChoice};
use tunestudio::device::{Gpu, Machine, Opened, Request, open, plan_target};
use tunestudio::session::{Event, StartOptions, start};

const GIB: u64 = 1 << 30;

fn open_gpu(req: &Request) -> tunestudio::backend::cuda::CudaBackend {
    match open(req, false) {
        Ok(Opened::Cuda(be)) => *be,
        Ok(Opened::Cpu { .. }) => panic!("a GPU host opened the CPU for {req:?}"),
        Err(u) => panic!("{}", u.message()),
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn telemetry_reads_the_card_while_it_works() {
    let be = open_gpu(&Request { device: DeviceChoice::Cuda, ..Default::default() });
    let pci = be.device().pci_bus_id.expect("the backend names its card's PCI bus id");
    let first = nvml::sample(&pci).expect("NVML reads the card the backend runs on");
    println!("DEVICE {} at {pci}: {first:?}", be.card().describe());
    let (tx, rx) = crossbeam_channel::unbounded();
    let started = Instant::now();
    let sampler = tunestudio::session::telemetry::Sampler::start(pci.clone(), started, tx).expect("sampler");
    // Keep the card busy for about 3.5 s: 4096² GEMMs.
    let n = 4096;
    let x = be.upload(&vec![0.01; n * n], DType::Act).unwrap();
    let w = be
        .upload_weight(&tunestudio::backend::HostWeight::Dense { out_features: n, in_features: n, data: vec![0.02; n * n] }, None)
        .unwrap();
    let mut y = be.alloc(n * n, DType::Act).unwrap();
    let dims = tunestudio::backend::LinearDims { n, inp: n, out: n };
    while started.elapsed() < Duration::from_millis(3500) {
        for _ in 0..20 {
            be.linear_fwd(&x, &w, None, dims, &mut y).unwrap();
        }
        be.synchronize().unwrap();
    }
    drop(sampler);
    let samples: Vec<GpuSample> = rx.try_iter().filter_map(|e| if let Event::Gpu(s) = e { Some(s) } else { None }).collect();
    assert!(samples.len() >= 2, "about one sample a second: {}", samples.len());
    for s in &samples {
        println!("SAMPLE {s:?}");
        assert!(s.memory_total_bytes > 0 && s.elapsed_s > 0.5 && s.elapsed_s < 10.0, "{s:?}");
        if let (Some(c), Some(m)) = (s.sm_clock_mhz, s.sm_clock_max_mhz) {
            assert!(c > 0.0 && c <= m, "{s:?}");
        }
        if let (Some(p), Some(l)) = (s.power_w, s.power_limit_w) {
            assert!(p > 0.0 && p <= l * 1.2, "{s:?}");
        }
        if let Some(ours) = s.memory_ours_bytes {
            assert!(ours >= 3 * (n * n * 2) as u64, "our GEMM buffers are ours: {s:?}");
        }
    }
    assert!(samples.iter().any(|s| s.utilization_pct.is_some_and(|u| u > 10.0)), "the card was busy: {samples:?}");
    if let Ok(path) = std::env::var("TUNESTUDIO_TELEMETRY_RECORD") {
        let lines: Vec<String> = (0..20)
            .map(|i| {
                std::thread::sleep(Duration::from_millis(250));
                let raw = nvml::sample(&pci).unwrap();
                serde_json::json!({"elapsed_s": i as f64 * 0.25, "raw": raw}).to_string()
            })
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        println!("RECORDED {path}");
    }
}

/// What other processes hold is measured apart from our own buffers and context; a cap bounds
/// what the plan gives us, and the allocator refuses to go past it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn the_plan_target_of_an_open_backend_and_a_cap_it_enforces() {
    let cap = 3 * GIB;
    let be = open_gpu(&Request { device: DeviceChoice::Cuda, card: None, memory_cap: Some(cap) });
    let gpu = Gpu::of_backend(&be);
    println!("DEVICE {} context {:?} others {:?}", gpu.card.describe(), be.context_bytes(), gpu.others_bytes);
    let others = gpu.others_bytes.expect("measured");
    assert!(others < gpu.card.memory_bytes, "{others}");
    let target = plan_target(
        &Request { device: DeviceChoice::Cuda, card: None, memory_cap: Some(cap) },
        &Machine { gpu: Some(gpu), ..Machine::default() },
    );
    assert_eq!(target.available_bytes(), Some(cap.min(target.total_bytes.unwrap() - target.others_bytes)));
    // 1 GiB fits under the cap, 3 GiB more does not.
    let a = be.alloc((GIB / 2) as usize, DType::Act).unwrap();
    let e = be.alloc((3 * GIB / 2) as usize, DType::Act).err().expect("the cap is a hard limit");
    let msg = e.to_string();
    println!("REFUSED {msg}");
    assert!(msg.contains("cap"), "{msg}");
    drop(a);
}

/// The demo under a memory cap on the GPU: the session plans for the card it opened (the cap
/// included) and reports it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_run_under_a_cap_reports_its_target() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut cfg) = tunestudio::assets::demo_config().unwrap();
    cfg.output.dir = tmp.path().to_path_buf();
    cfg.train.max_steps = Some(20);
    cfg.train.device = DeviceChoice::Cuda;
    cfg.memory.gpu_mem = Some(ByteSize(2 * GIB));
    let h = start(cfg, StartOptions::default());
    let events: Vec<Event> = h.events.iter().collect();
    h.join();
    let mut loaded = None;
    for e in &events {
        match e {
            Event::Loaded(info) => loaded = Some(info.clone()),
            Event::Failed { message, .. } => panic!("{message}"),
            Event::Log(m) => println!("LOG {m}"),
            _ => {}
        }
    }
    let info = loaded.expect("loaded");
    println!("TARGET {:?}", info.target);
    assert_eq!(info.target.cap_bytes, Some(2 * GIB));
    assert_eq!(info.target.available_bytes().map(|a| a <= 2 * GIB), Some(true));
    assert!(info.target.card.is_some());
    assert!(events.iter().any(|e| matches!(e, Event::Finished(_))));
}

/// `auto` on a GPU host opens the GPU, whatever `cpu_fallback` says.
#[test]
#[ignore = "needs a CUDA GPU"]
fn auto_opens_the_gpu() {
    for fallback in [false, true] {
        assert!(matches!(open(&Request::default(), fallback), Ok(Opened::Cuda(_))));
    }
}
