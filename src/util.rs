//! Small helpers shared by every module: atomic writes and human-readable sizes.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Write `bytes` to `path` through a temporary file in the same folder and a rename, so a crash
/// never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_path(dir)?;
    let name = path.file_name().ok_or_else(|| Error::file(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, e));
    }
    Ok(())
}

/// Replace folder `dest` by a folder built by `fill` in a temporary sibling, renamed into place
/// only when `fill` succeeds; on failure nothing is left behind.
pub fn write_dir_atomic(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| cannot_create(dest, e))?;
    let name = dest.file_name().ok_or_else(|| Error::file(dest, "not a folder path"))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| cannot_create(dest, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(told_of_dest(e, &tmp, dest));
    }
    let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(dest, &old).with_path(dest)?;
    }
    if let Err(e) = std::fs::rename(&tmp, dest) {
        if had_old {
            let _ = std::fs::rename(&old, dest);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::file(dest, e));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// A folder that could not be created (read-only or full disk), named as the user chose it, not
/// as the hidden temporary sibling it is first written to.
pub fn cannot_create(dest: &Path, e: std::io::Error) -> Error {
    Error::file(dest, format!("cannot be created: {e}"))
}

/// An error met while filling `tmp`, the temporary folder that becomes `dest`, told of `dest`:
/// the user chose `dest`, and `tmp` is gone by the time the message is read.
pub fn told_of_dest(e: Error, tmp: &Path, dest: &Path) -> Error {
    let moved = |path: PathBuf| match path.strip_prefix(tmp) {
        Ok(rest) if rest.as_os_str().is_empty() => dest.to_path_buf(),
        Ok(rest) => dest.join(rest),
        Err(_) => path,
    };
    match e {
        Error::File { path, msg } => Error::File { path: moved(path), msg },
        Error::Line { path, line, msg } => Error::Line { path: moved(path), line, msg },
        other => other,
    }
}

pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

pub fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "?".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, (s / 60) % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", secs)
    }
}

/// Parse sizes such as `24GiB`, `24GB`, `24G`, `1.5 TiB`, `512MiB`, `100B` (binary units
/// throughout). A bare number is refused, not taken as bytes: `--gpu-mem 24` meant 24 GiB, and
/// planning for a 24-byte card helps nobody.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("`{text}` is not a size such as 24GiB or 80GB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" => return Err(format!("`{text}` has no unit: write {num}GiB (or {num}GB, {num}MiB, {num}B)")),
        "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("`{text}`: unknown unit `{other}` (use B, KiB, MiB, GiB or TiB)")),
    };
    Ok((v * mult as f64).round() as u64)
}

/// `8.03B`, `1.24M`, `512`.
pub fn fmt_count(n: u64) -> String {
    let v = n as f64;
    if v >= 1e9 {
        format!("{:.2}B", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else {
        n.to_string()
    }
}

/// UTC date and time as (`YYYY-MM-DD`, `HH:MM:SS`), from the system clock (no time-zone database).
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's well-known derivation.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (format!("{y:04}-{m:02}-{d:02}"), format!("{:02}:{:02}:{:02}", rem / 3600, (rem / 60) % 60, rem % 60))
}

/// Resident memory of this process, from /proc (None elsewhere).
pub fn process_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("1.5 GB"), Ok(3 << 29));
        assert_eq!(parse_bytes("512B"), Ok(512));
        assert!(parse_bytes("x").unwrap_err().contains("not a size"));
        assert!(parse_bytes("24").unwrap_err().contains("no unit: write 24GiB"));
        assert!(parse_bytes("24 parsecs").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn atomic_dir_replaces_or_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        write_dir_atomic(&dest, |p| write_atomic(&p.join("a"), b"1")).unwrap();
        assert!(dest.join("a").exists());
        let r = write_dir_atomic(&dest, |_| Err(Error::op("test", "boom")));
        assert!(r.is_err());
        assert!(dest.join("a").exists(), "failed write must keep the old folder");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temp folder left behind");
    }
}
