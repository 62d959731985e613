//! Every card profile, on any machine: the attention kernels the CUDA backend would run on that card
//! (chosen by `attention_kernels_for`, the function the backend itself calls when it opens) fit the
//! card's shared memory per block for every head dim the engine supports; cards the engine cannot
//! run are refused by name with what to do.

use tunestudio::backend::card::{PROFILES, PtxTarget};
use tunestudio::backend::cuda::kernels::{ATTN_FWD_VARIANTS, ATTN_HEAD_DIMS, attention_kernels_for};

#[test]
fn every_supported_profile_runs_every_head_dim_within_its_limits() {
    for p in PROFILES.iter().filter(|p| p.supported()) {
        let card = p.limits();
        for hd in ATTN_HEAD_DIMS {
            let k = attention_kernels_for(&card, hd).unwrap_or_else(|e| panic!("{}: head_dim {hd}: {e}", card.describe()));
            for (what, smem, threads) in
                [("forward", k.fwd.smem_bytes(), k.fwd.threads()), ("backward", k.bwd.smem_bytes(), k.bwd.threads())]
            {
                assert!(smem <= card.smem_per_block_optin, "{}: {what} for head_dim {hd} takes {smem} B", p.key);
                // 255 registers per thread at most (every instance caps itself there).
                assert!(threads * 255 <= card.regs_per_sm, "{}: {what} for head_dim {hd}: {threads} threads", p.key);
                assert!(threads <= card.max_threads_per_sm);
            }
            assert_eq!((k.fwd.head_dim, k.bwd.head_dim), (hd, hd));
        }
        // Hopper loads its own PTX; every other card the compute_80 build.
        let want = if card.compute_capability.0 == 9 { PtxTarget::Sm90 } else { PtxTarget::Sm80 };
        assert_eq!(card.ptx_target(), want, "{}", p.key);
    }
}

#[test]
fn a_bigger_card_never_gets_a_slower_instance() {
    // The instance lists run fastest first: a card with more shared memory picks an earlier one.
    let by_key = |k: &str| PROFILES.iter().find(|p| p.key == k).unwrap().limits();
    let index = |card: &tunestudio::backend::card::CardLimits, hd| {
        let f = attention_kernels_for(card, hd).unwrap().fwd.kernel;
        ATTN_FWD_VARIANTS.iter().position(|v| v.kernel == f).unwrap()
    };
    for hd in ATTN_HEAD_DIMS {
        assert!(index(&by_key("h100-80"), hd) <= index(&by_key("a100-40"), hd));
        assert!(index(&by_key("a100-40"), hd) <= index(&by_key("rtx4090"), hd));
    }
}

#[test]
fn cards_below_ampere_are_refused_with_the_reason() {
    let old: Vec<_> = PROFILES.iter().filter(|p| !p.supported()).collect();
    assert!(old.len() >= 3, "T4, V100 and RTX 20 are profiled so that choosing them says why they cannot run");
    for p in old {
        let why = p.limits().check_supported().unwrap_err().to_string();
        assert!(why.contains(p.name) && why.contains("bf16") && why.contains("CPU"), "{why}");
    }
}
