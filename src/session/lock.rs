//! One process per run folder. A process that trains, resumes, restarts or exports from a run
//! folder holds an exclusive advisory lock (`flock`) on `RUN/.lock` for as long as it does; a
//! second process is refused with the holder's process id. The operating system releases the lock
//! of a process that dies (kill -9, power loss), so a lock can never be stuck; the file keeps the
//! holder's id and purpose while held and is emptied on a clean release, so a non-empty file whose
//! lock is free was left by a process that died, and taking it over is worth a note.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const LOCK_FILE: &str = ".lock";

/// The held lock of a run folder; released when dropped.
#[derive(Debug)]
pub struct RunLock {
    /// `None` for a folder nobody can write (a read-only export source needs no lock).
    file: Option<File>,
    path: PathBuf,
    /// Who held the lock last without releasing it (a process that died), if anyone.
    pub stale: Option<String>,
}

/// What the lock file says about its holder: `pid 1234 (train since 2025-01-01T10:00:00Z)`.
fn describe(content: &str) -> Option<String> {
    let mut parts = content.trim().splitn(2, ' ');
    let pid: u32 = parts.next()?.parse().ok()?;
    let rest = parts.next().unwrap_or("").trim();
    let this = if pid == std::process::id() { ", this process" } else { "" };
    Some(if rest.is_empty() { format!("process {pid}{this}") } else { format!("process {pid} ({rest}{this})") })
}

fn read_all(f: &mut File) -> String {
    let mut s = String::new();
    let _ = f.seek(SeekFrom::Start(0)).and_then(|_| f.read_to_string(&mut s));
    s
}

impl RunLock {
    /// Take the lock of `run_dir` for `purpose` (`train`, `resume`, `export`, …), or fail with an
    /// error naming the process that holds it.
    pub fn acquire(run_dir: &Path, purpose: &str) -> Result<RunLock> {
        let path = run_dir.join(LOCK_FILE);
        let mut file = match OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path) {
            Ok(f) => f,
            // Nobody can write a read-only folder, so there is nothing to guard: reading it is safe.
            Err(e)
                if purpose == "export"
                    && matches!(e.kind(), std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem) =>
            {
                return Ok(RunLock { file: None, path, stale: None });
            }
            Err(e) => return Err(Error::file(run_dir, format!("cannot create its lock file {LOCK_FILE}: {e}"))),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let who = describe(&read_all(&mut file)).unwrap_or_else(|| "another process".into());
                return Err(Error::file(
                    run_dir,
                    format!("is in use by {who}: two processes never share a run folder; wait for it to end, or stop it"),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(Error::file(&path, format!("cannot be locked: {e}"))),
        }
        let stale = describe(&read_all(&mut file));
        let (d, t) = crate::util::utc_now();
        let line = format!("{} {purpose} since {d}T{t}Z\n", std::process::id());
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(line.as_bytes()))
            .map_err(|e| Error::file(&path, e))?;
        Ok(RunLock { file: Some(file), path, stale })
    }

    /// Who holds the lock of `run_dir` now, without taking it (`None`: nobody).
    pub fn holder(run_dir: &Path) -> Option<String> {
        let mut file = File::open(run_dir.join(LOCK_FILE)).ok()?;
        match file.try_lock() {
            Ok(()) => None,
            Err(TryLockError::WouldBlock) => Some(describe(&read_all(&mut file)).unwrap_or_else(|| "another process".into())),
            Err(TryLockError::Error(_)) => None,
        }
    }

    /// The run folder this lock is for, where the process may write (`None`: a folder nobody can
    /// write, read without a lock).
    pub fn writable_run_dir(&self) -> Option<&Path> {
        self.file.as_ref().and(self.path.parent())
    }

    /// A line for the log when this lock was taken over from a process that died holding it.
    pub fn stale_note(&self) -> Option<String> {
        self.stale.as_ref().map(|who| format!("took over the lock of {} left by {who}, which is no longer running", self.path.display()))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Emptied while still held, so the next holder knows this release was clean; closing the
        // file releases the lock.
        if let Some(f) = &self.file {
            let _ = f.set_len(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid_and_a_dead_holder_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let a = RunLock::acquire(d.path(), "train").unwrap();
        assert!(a.stale.is_none());
        let e = RunLock::acquire(d.path(), "export").unwrap_err().to_string();
        assert!(e.contains(&format!("process {}", std::process::id())) && e.contains("train since"), "{e}");
        assert!(RunLock::holder(d.path()).is_some());
        drop(a);
        assert!(RunLock::holder(d.path()).is_none());
        // A clean release leaves no stale note.
        let b = RunLock::acquire(d.path(), "resume").unwrap();
        assert!(b.stale.is_none());
        drop(b);
        // A holder that died leaves its line behind with the lock free.
        std::fs::write(d.path().join(LOCK_FILE), "4194000 train since 2025-01-01T00:00:00Z\n").unwrap();
        let c = RunLock::acquire(d.path(), "train").unwrap();
        assert!(c.stale_note().unwrap().contains("process 4194000"), "{:?}", c.stale_note());
    }
}
