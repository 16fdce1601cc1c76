//! Nothing half-written: every output (and reject) file is written to a hidden temporary file
//! in its final directory, flushed and `fsync`ed; only when the whole run has succeeded are
//! they renamed into place and the directories synced. A failed run — an error, a stopped run,
//! a panic — removes its temporary files when [`Staging`] is dropped, so the output directory
//! never holds a partial file. (A killed process can leave `.*.deid-tmp` files, never a file
//! under an output name.)

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::DeidError;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DeidError + 'a {
    move |source| DeidError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Temporary files of one run, and where they go.
#[derive(Debug, Default)]
pub(crate) struct Staging {
    files: Mutex<Vec<(PathBuf, PathBuf)>>,
    counter: AtomicU64,
}

/// An output being written.
pub(crate) struct StagedFile {
    tmp: PathBuf,
    writer: BufWriter<File>,
    written: u64,
}

impl StagedFile {
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> Result<(), DeidError> {
        self.written += bytes.len() as u64;
        self.writer.write_all(bytes).map_err(io("write", &self.tmp))
    }

    /// Flushes and syncs the file's data to disk.
    pub(crate) fn finish(self) -> Result<u64, DeidError> {
        let tmp = self.tmp;
        let file = self.writer.into_inner().map_err(|e| DeidError::Io {
            op: "write",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io("sync", &tmp))?;
        Ok(self.written)
    }
}

impl Staging {
    /// Starts the file that becomes `dest` on commit.
    pub(crate) fn create(&self, dest: &Path) -> Result<StagedFile, DeidError> {
        self.create_with(dest, false)
    }

    /// Starts a file only its owner may read (0600 on Unix): reject files hold the original,
    /// identifying records.
    pub(crate) fn create_private(&self, dest: &Path) -> Result<StagedFile, DeidError> {
        self.create_with(dest, true)
    }

    fn create_with(&self, dest: &Path, private: bool) -> Result<StagedFile, DeidError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}-{n}.deid-tmp", std::process::id()));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let file = options.open(&tmp).map_err(io("create", &tmp))?;
        if let Ok(mut files) = self.files.lock() {
            files.push((tmp.clone(), dest.to_owned()));
        }
        Ok(StagedFile {
            tmp,
            writer: BufWriter::with_capacity(1 << 20, file),
            written: 0,
        })
    }

    /// Renames every staged file into place and syncs the directories.
    pub(crate) fn commit(self) -> Result<(), DeidError> {
        let files = std::mem::take(&mut *self.files.lock().map_err(|_| DeidError::WorkerPanicked)?);
        // A rename replaces a device, FIFO, socket or symbolic link instead of writing into
        // it: refuse before renaming anything, and leave the staged files to be removed.
        let odd = files.iter().find(|(_, dest)| {
            fs::symlink_metadata(dest).is_ok_and(|meta| !meta.file_type().is_file())
        });
        if let Some((_, dest)) = odd {
            let dest = dest.clone();
            if let Ok(mut staged) = self.files.lock() {
                *staged = files;
            }
            return Err(io("replace", &dest)(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file: not replaced",
            )));
        }
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut rest = files.into_iter();
        while let Some((tmp, dest)) = rest.next() {
            if let Err(e) = fs::rename(&tmp, &dest) {
                // Put back what is not renamed, so that dropping removes it.
                let mut left = vec![(tmp, dest.clone())];
                left.extend(rest);
                if let Ok(mut files) = self.files.lock() {
                    *files = left;
                }
                return Err(io("rename into", &dest)(e));
            }
            if let Some(dir) = dest.parent() {
                if !dirs.iter().any(|d| d == dir) {
                    dirs.push(dir.to_owned());
                }
            }
        }
        for dir in dirs {
            // Durability of the renames; some platforms cannot open directories.
            if let Ok(d) = File::open(&dir) {
                d.sync_all().map_err(io("sync", &dir))?;
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let files = match self.files.get_mut() {
            Ok(f) => std::mem::take(f),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        for (tmp, _) in files {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// Regression: committing renamed staged outputs over whatever had their names — a FIFO
    /// or a symbolic link was replaced. Now nothing is renamed, the odd entry stays, and the
    /// staged files are removed.
    #[test]
    fn a_commit_never_replaces_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("patients.csv");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let first = dir.path().join("allergies.csv");
        let staging = Staging::default();
        for dest in [&first, &fifo] {
            let mut file = staging.create(dest).expect("stage");
            file.write_all(b"a,b\n").expect("write");
            file.finish().expect("finish");
        }
        let refused = staging.commit();
        assert!(
            matches!(&refused, Err(DeidError::Io { op: "replace", .. })),
            "{refused:?}"
        );
        use std::os::unix::fs::FileTypeExt as _;
        assert!(fs::symlink_metadata(&fifo)
            .expect("fifo")
            .file_type()
            .is_fifo());
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["patients.csv".to_string()],
            "nothing renamed, nothing left"
        );
    }
}
