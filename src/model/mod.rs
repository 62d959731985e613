//! The model on the host: its architecture (`arch`), its weights (`weights`), its tokenizer and
//! chat template (`tokenizer`), and the untrained-token detector (`untrained`). `check_folder`
//! says what is wrong with a folder that is not a model before any of them tries to read it.

pub mod arch;
pub mod chat_template;
pub mod tokenizer;
pub mod untrained;
pub mod weights;

use std::path::Path;

pub use arch::ModelSpec;
pub use weights::WeightStore;

use crate::error::{Error, Result};

const WANTED: &str = "choose a Hugging Face model folder (config.json, *.safetensors and tokenizer.json)";

/// A folder that holds a `config.json`, checked before reading it (all `plan` needs), so a wrong
/// folder gets a sentence that says what to choose instead of the operating system's
/// "(os error 2)".
pub fn check_config_folder(dir: &Path) -> Result<()> {
    let fail = |what: String| Err(Error::file(dir, what));
    if !dir.exists() {
        return fail(format!("does not exist: {WANTED}"));
    }
    if !dir.is_dir() {
        return fail(format!("is a file, not a folder: {WANTED}"));
    }
    if !dir.join("config.json").is_file() {
        // A folder one level up from the model (a Hugging Face cache entry, a download folder).
        let inner: Vec<String> = std::fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.path().join("config.json").is_file())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        return match inner.as_slice() {
            [one] => fail(format!("has no config.json, but {one}/ inside it has: choose {}", dir.join(one).display())),
            _ => fail(format!("has no config.json, so it is not a model folder: {WANTED}")),
        };
    }
    Ok(())
}

/// What a model folder must hold to be trained, evaluated or described: `check_weights_folder`
/// and `tokenizer.json`.
pub fn check_folder(dir: &Path) -> Result<()> {
    check_weights_folder(dir)?;
    if !dir.join("tokenizer.json").is_file() {
        return Err(Error::file(dir, "has no tokenizer.json: copy the model's tokenizer files into it"));
    }
    Ok(())
}

/// What a model folder must hold to be merged with an adapter: `check_config_folder` and
/// safetensors weights. A merge copies the tokenizer files when there are some and needs none.
pub fn check_weights_folder(dir: &Path) -> Result<()> {
    check_config_folder(dir)?;
    let fail = |what: String| Err(Error::file(dir, what));
    let files: Vec<String> =
        std::fs::read_dir(dir).map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect()).unwrap_or_default();
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        let other = files.iter().find(|f| f.ends_with(".bin") || f.ends_with(".gguf") || f.ends_with(".pth"));
        return fail(match other {
            Some(f) => format!(
                "holds {f} but no *.safetensors: TuneStudio reads safetensors weights (convert them, or download the safetensors version)"
            ),
            None => "has no *.safetensors weights: download the model's weights into it".to_string(),
        });
    }
    Ok(())
}

/// The spec of a folder that is to be read whole (trained, evaluated, described): the folder is
/// checked, then `config.json` read (an unknown architecture is named before missing weights),
/// then the weights and tokenizer are checked.
pub fn spec_of_folder(dir: &Path) -> Result<ModelSpec> {
    check_config_folder(dir)?;
    let spec = ModelSpec::from_dir(dir)?;
    check_folder(dir)?;
    Ok(spec)
}

/// `spec_of_folder` for a folder whose weights are read but whose tokenizer is not (a merge).
pub fn spec_of_weights_folder(dir: &Path) -> Result<ModelSpec> {
    check_config_folder(dir)?;
    let spec = ModelSpec::from_dir(dir)?;
    check_weights_folder(dir)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_model_folder_says_what_to_choose() {
        let d = tempfile::tempdir().unwrap();
        let msg = |p: &Path| check_folder(p).unwrap_err().to_string();
        assert!(msg(&d.path().join("missing")).contains("does not exist: choose a Hugging Face model folder"));
        let file = d.path().join("f.txt");
        std::fs::write(&file, "").unwrap();
        assert!(msg(&file).contains("is a file, not a folder"));
        let model = d.path().join("snapshots").join("abc");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let up = msg(&d.path().join("snapshots"));
        assert!(up.contains("abc/ inside it has") && up.contains(&model.display().to_string()), "{up}");
        std::fs::write(model.join("pytorch_model.bin"), "").unwrap();
        assert!(msg(&model).contains("holds pytorch_model.bin but no *.safetensors"), "{}", msg(&model));
        std::fs::write(model.join("model.safetensors"), "").unwrap();
        assert!(msg(&model).contains("no tokenizer.json"));
        // A merge reads the weights only: no tokenizer is needed.
        check_weights_folder(&model).unwrap();
        std::fs::write(model.join("tokenizer.json"), "").unwrap();
        check_folder(&model).unwrap();
        for m in [msg(&d.path().join("missing")), up] {
            assert!(!m.contains("os error"), "{m}");
        }
    }
}
