//! `tunestudio inspect`: what a model folder holds, before anything is loaded on a device.

use std::path::Path;

use serde_json::json;

use crate::error::Result;
use crate::model::tokenizer::TokenizerBundle;
use crate::model::{WeightStore, untrained};
use crate::util::{fmt_bytes, fmt_count};

pub fn run(model_dir: &Path, as_json: bool) -> Result<()> {
    let spec = crate::model::spec_of_folder(model_dir)?;
    let store = WeightStore::open(model_dir)?;
    let tok = TokenizerBundle::load(model_dir)?;
    let mut exclude: Vec<u32> = [tok.bos_id(), tok.eos_id(), Some(tok.pad_id())].into_iter().flatten().collect();
    exclude.extend(spec.eos_token_ids.iter().copied());
    let found = untrained::classify(&store, &spec, &exclude)?;
    let rows: Vec<(u32, String, untrained::RowKind)> =
        found.iter().map(|r| (r.id, tok.token_text(r.id).unwrap_or_default(), r.kind)).collect();
    // Damaged weights are described like the rest, then make the command fail.
    let finite = store.check_finite();
    if as_json {
        let v = json!({
            "spec": spec,
            "total_params": spec.total_params(),
            "dtypes": store.dtype_counts(),
            "weights_bytes": store.total_bytes(),
            "chat_template": tok.chat_template().is_some(),
            "untrained_tokens": rows.iter().map(|(i, t, k)| json!({"id": i, "text": t, "kind": k})).collect::<Vec<_>>(),
            "non_finite": finite.as_ref().err().map(ToString::to_string),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return finite;
    }
    println!("model        {}", model_dir.display());
    println!("architecture {}", spec.summary());
    println!(
        "parameters   {} total ({} in decoder linears), {} on disk",
        fmt_count(spec.total_params()),
        fmt_count(spec.linear_params()),
        fmt_bytes(store.total_bytes())
    );
    let dtypes: Vec<String> = store.dtype_counts().iter().map(|(d, n)| format!("{d} ×{n}")).collect();
    println!("dtypes       {}", dtypes.join(", "));
    println!(
        "context      {} positions, rope θ {}{}{}",
        spec.max_position_embeddings,
        spec.rope_theta,
        spec.rope_scaling.as_ref().map(|s| format!(", scaling {s:?}")).unwrap_or_default(),
        spec.local_rope.as_ref().map(|r| format!("; sliding-window layers θ {}", r.theta)).unwrap_or_default()
    );
    if spec.text_tower {
        println!("text model   of a multimodal folder (text_config); the other towers pass through exports unchanged");
    }
    println!(
        "tokenizer    {} tokens, chat template {}",
        tok.vocab_size(),
        if tok.chat_template().is_some() { "present" } else { "absent" }
    );
    if rows.is_empty() {
        println!("untrained    none");
    } else {
        println!("untrained    {} token rows in embed_tokens and lm_head are zero or one vector shared by several tokens:", rows.len());
        for (i, t, k) in rows.iter().take(40) {
            println!("             {i:>7}  {t:<32} {}", k.words());
        }
        if rows.len() > 40 {
            println!("             … and {} more", rows.len() - 40);
        }
    }
    println!("values       {}", if finite.is_ok() { "all finite" } else { "NOT all finite (below)" });
    finite
}
