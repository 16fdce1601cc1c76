//! [`Envelope`]: envelope encryption of byte slices, streams and files over a [`KmsClient`],
//! with data-key caching.
//!
//! Files are written atomically: to a temporary file (mode 0600) in the destination's folder,
//! flushed and fsynced, then renamed over the destination. A failure (a tampered ciphertext, a
//! full disk) or a cancellation through the progress callback removes the temporary file, so
//! no half-written or unauthenticated output is left behind. Only a process killed outright
//! (`SIGKILL`, power loss) can leave a `.kms-partial-*` file; callers that handle signals
//! should cancel through the callback instead of exiting.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::cache::{CachePolicy, DataKeyCache, PlainKey};
use crate::client::{Context, DataKey, KmsClient, ReEncryptItem};
use crate::envelope::{self, Header, DEFAULT_FRAME_SIZE};
use crate::error::Error;

/// What a file operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    /// Plaintext bytes processed.
    pub plaintext_bytes: u64,
    /// The master key named in the header.
    pub key_id: String,
}

/// Envelope encryption with a KMS client and a data-key cache.
#[derive(Clone)]
pub struct Envelope {
    client: KmsClient,
    cache: Arc<DataKeyCache>,
    frame_size: u32,
}

impl Envelope {
    /// Envelope encryption over `client`, caching data keys under `policy`.
    pub fn new(client: KmsClient, policy: CachePolicy) -> Self {
        Envelope {
            client,
            cache: Arc::new(DataKeyCache::new(policy)),
            frame_size: DEFAULT_FRAME_SIZE,
        }
    }

    /// Uses another frame size for new messages (1 byte to 16 MiB).
    pub fn with_frame_size(mut self, frame_size: u32) -> Result<Self, Error> {
        if frame_size == 0 || frame_size > envelope::MAX_FRAME_SIZE {
            return Err(Error::InvalidArgument(
                "frame size must be 1 byte to 16 MiB",
            ));
        }
        self.frame_size = frame_size;
        Ok(self)
    }

    /// The underlying client.
    pub fn client(&self) -> &KmsClient {
        &self.client
    }

    /// A data key (cached or fresh) and a new header for a message of `bytes` plaintext bytes.
    /// Pass both to [`envelope::seal_stream`] to encrypt a stream.
    pub async fn begin_encrypt(
        &self,
        key: &str,
        context: &Context,
        bytes: u64,
    ) -> Result<(Arc<DataKey>, Header), Error> {
        proto::context::validate(context)
            .map_err(|_| Error::InvalidArgument("encryption context out of limits"))?;
        let canonical = proto::context::encode(context);
        let data_key = match self.cache.take_encrypt(key, &canonical, bytes) {
            Some(dk) => dk,
            None => {
                let dk = Arc::new(self.client.generate_data_key(key, context).await?);
                self.cache
                    .put_encrypt(key, &canonical, Arc::clone(&dk), bytes);
                dk
            }
        };
        let header = Header::new(
            &data_key.key_id,
            &data_key.blob,
            context,
            self.frame_size,
            &data_key.plaintext,
        )?;
        Ok((data_key, header))
    }

    /// The data key of a message whose header was read, after checking that the header's
    /// context is exactly `context`. Pass it to [`envelope::open_stream`].
    pub async fn begin_decrypt(
        &self,
        header: &Header,
        context: &Context,
        bytes: u64,
    ) -> Result<Arc<PlainKey>, Error> {
        if &header.context != context {
            return Err(Error::InvalidCiphertext);
        }
        let canonical = proto::context::encode(context);
        if let Some(key) = self
            .cache
            .take_decrypt(&header.wrapped_dek, &canonical, bytes)
        {
            return Ok(key);
        }
        let opened = match self
            .client
            .decrypt(&header.wrapped_dek, context, Some(&header.key_id))
            .await
        {
            Ok(opened) => opened,
            // The blob and key id come from the message: an unknown key id or a refused blob
            // means the message is bad. A destroyed key is reported as such.
            Err(Error::Rpc {
                code: tonic::Code::InvalidArgument,
                ..
            }) => return Err(Error::InvalidCiphertext),
            Err(Error::Rpc {
                code: tonic::Code::NotFound,
                message,
            }) if message == "key not found" => return Err(Error::InvalidCiphertext),
            Err(e) => return Err(e),
        };
        let mut key = Zeroizing::new([0u8; 32]);
        if opened.plaintext.len() != key.len() {
            return Err(Error::InvalidCiphertext);
        }
        key.copy_from_slice(&opened.plaintext);
        let key = Arc::new(key);
        self.cache
            .put_decrypt(&header.wrapped_dek, &canonical, Arc::clone(&key), bytes);
        Ok(key)
    }

    /// Encrypts a byte slice into one message.
    pub async fn encrypt(
        &self,
        key: &str,
        context: &Context,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let (data_key, header) = self
            .begin_encrypt(key, context, plaintext.len() as u64)
            .await?;
        envelope::seal(&data_key.plaintext, &header, plaintext)
    }

    /// Decrypts one message made by [`Envelope::encrypt`] under exactly `context`.
    pub async fn decrypt(
        &self,
        context: &Context,
        message: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let mut body = message;
        let header = Header::read_from(&mut body)?;
        let key = self
            .begin_decrypt(&header, context, body.len() as u64)
            .await?;
        envelope::open(&key, &header, body)
    }

    /// Encrypts the file `src` into `dst` (atomically). `progress` gets the plaintext bytes
    /// read so far; returning `ControlFlow::Break` cancels ([`Error::Cancelled`]).
    pub async fn encrypt_file(
        &self,
        key: &str,
        context: &Context,
        src: &Path,
        dst: &Path,
        progress: impl Fn(u64) -> ControlFlow<()> + Send + 'static,
    ) -> Result<FileSummary, Error> {
        let len = std::fs::metadata(src)?.len();
        let (data_key, header) = self.begin_encrypt(key, context, len).await?;
        let (src, dst) = (src.to_path_buf(), dst.to_path_buf());
        let key_id = data_key.key_id.clone();
        let plaintext_bytes = blocking(move || {
            let reader = Progress {
                inner: BufReader::new(File::open(&src)?),
                done: 0,
                report: progress,
            };
            write_atomically(&dst, |out| {
                envelope::seal_stream(&data_key.plaintext, &header, reader, out)
            })
        })
        .await?;
        Ok(FileSummary {
            plaintext_bytes,
            key_id,
        })
    }

    /// Decrypts the file `src` into `dst` (atomically), requiring exactly `context`.
    pub async fn decrypt_file(
        &self,
        context: &Context,
        src: &Path,
        dst: &Path,
        progress: impl Fn(u64) -> ControlFlow<()> + Send + 'static,
    ) -> Result<FileSummary, Error> {
        let len = std::fs::metadata(src)?.len();
        let mut reader = BufReader::new(File::open(src)?);
        let header = Header::read_from(&mut reader)?;
        let key = self.begin_decrypt(&header, context, len).await?;
        let dst = dst.to_path_buf();
        let key_id = header.key_id.clone();
        let plaintext_bytes = blocking(move || {
            let reader = Progress {
                inner: reader,
                done: 0,
                report: progress,
            };
            write_atomically(&dst, |out| {
                envelope::open_stream(&key, &header, reader, out)
            })
        })
        .await?;
        Ok(FileSummary {
            plaintext_bytes,
            key_id,
        })
    }
}

/// What [`Envelope::rewrap_files`] did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    /// The key version of the wrapped data key before.
    pub from_version: Option<u32>,
    /// The key version after.
    pub to_version: u32,
}

impl Envelope {
    /// Moves the wrapped data key of each file to its key's primary version (one
    /// `BatchReEncrypt` call per 100 files; the plaintext data key never leaves the server),
    /// rewriting only the header: the body is copied byte for byte. Each file is replaced
    /// atomically (temporary file, fsync, rename), so an interrupted run leaves every file
    /// either as it was or fully rewrapped, and running again resumes. One result per file.
    pub async fn rewrap_files(&self, paths: &[PathBuf]) -> Vec<Result<Rewrapped, Error>> {
        let mut results = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(100) {
            let mut headers = Vec::with_capacity(chunk.len());
            for path in chunk {
                headers.push(
                    File::open(path)
                        .map_err(Error::from)
                        .and_then(|f| Header::read_from(&mut BufReader::new(f))),
                );
            }
            let items: Vec<ReEncryptItem> = headers
                .iter()
                .filter_map(|h| h.as_ref().ok())
                .map(|h| ReEncryptItem {
                    blob: h.wrapped_dek.clone(),
                    source_context: h.context.clone(),
                    destination_key: h.key_id.clone(),
                    destination_context: h.context.clone(),
                })
                .collect();
            let mut answers = match self.client.batch_re_encrypt(&items).await {
                Ok(answers) => answers.into_iter(),
                Err(e) => {
                    let reason = e.to_string();
                    results.extend(
                        chunk
                            .iter()
                            .map(|_| Err(Error::Io(std::io::Error::other(reason.clone())))),
                    );
                    continue;
                }
            };
            for (path, header) in chunk.iter().zip(headers) {
                let outcome = match header {
                    Err(e) => Err(e),
                    Ok(header) => match answers.next() {
                        Some(Ok(sealed)) => {
                            let (path, from_version) = (path.clone(), header.wrapped_key_version());
                            blocking(move || {
                                replace_header(&path, &header, &sealed.key_id, &sealed.blob)
                            })
                            .await
                            .map(|()| Rewrapped {
                                from_version,
                                to_version: sealed.key_version,
                            })
                        }
                        Some(Err(e)) => Err(e),
                        None => Err(Error::Protocol("batch answered too few items")),
                    },
                };
                results.push(outcome);
            }
        }
        results
    }
}

/// Rewrites `path` with a header carrying `wrapped_dek` and the old body.
fn replace_header(
    path: &Path,
    header: &Header,
    key_id: &str,
    wrapped_dek: &[u8],
) -> Result<(), Error> {
    let rewritten = header.with_wrapped_dek(key_id, wrapped_dek)?;
    let mut original = BufReader::new(File::open(path)?);
    // Skip the old header (re-read, so a file changed meanwhile is left alone, not corrupted).
    if Header::read_from(&mut original)? != *header {
        return Err(Error::Io(std::io::Error::other(
            "the file changed while being rewrapped (another rewrap?); run again",
        )));
    }
    write_atomically(path, |out| {
        out.write_all(rewritten.encoded())?;
        std::io::copy(&mut original, out)?;
        Ok(())
    })
}

async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
        .map_err(cancelled_to_error)
}

/// Writes through `fill` into a temporary file next to `dst`, fsyncs it, renames it over
/// `dst`, and fsyncs the folder. On any error the temporary file is removed.
fn write_atomically<T>(
    dst: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> Result<T, Error>,
) -> Result<T, Error> {
    let folder: PathBuf = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    ensure_replaceable(dst)?;
    let temp = tempfile::Builder::new()
        .prefix(".kms-partial-")
        .tempfile_in(&folder)?;
    let value = {
        let mut out = BufWriter::new(temp.as_file());
        let value = fill(&mut out)?;
        out.flush()?;
        value
    };
    temp.as_file().sync_all()?;
    // Again: the path may have changed while the body was written.
    ensure_replaceable(dst)?;
    temp.persist(dst).map_err(|e| Error::Io(e.error))?;
    File::open(&folder)?.sync_all()?;
    Ok(value)
}

/// Refuses to rename over anything but a regular file (or nothing): a rename replaces a
/// device, FIFO or socket node (`/dev/null` written as root became a file of plaintext) or
/// a symbolic link instead of writing through it.
fn ensure_replaceable(dst: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(dst) {
        Ok(meta) if !meta.file_type().is_file() => Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file: not replaced", dst.display()),
        ))),
        _ => Ok(()),
    }
}

struct Progress<R, F> {
    inner: R,
    done: u64,
    report: F,
}

/// The message of the I/O error that carries a cancellation through the stream functions.
const CANCELLED: &str = "cancelled by the caller";

impl<R: Read, F: Fn(u64) -> ControlFlow<()>> Read for Progress<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if (self.report)(self.done).is_break() {
            return Err(std::io::Error::other(CANCELLED));
        }
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        Ok(n)
    }
}

/// Turns the cancellation I/O error back into [`Error::Cancelled`].
fn cancelled_to_error(e: Error) -> Error {
    match e {
        Error::Io(io) if io.to_string() == CANCELLED => Error::Cancelled,
        other => other,
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt as _;

    /// Regression: an output that is a FIFO (as a device node) or a symbolic link was
    /// replaced by the rename; now it is refused and left as it was, with nothing staged left.
    #[test]
    fn only_regular_files_are_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let target = dir.path().join("target");
        std::fs::write(&target, b"kept").expect("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        for odd in [&fifo, &link] {
            let refused = write_atomically(odd, |out| Ok(out.write_all(b"secret")?));
            assert!(
                matches!(&refused, Err(Error::Io(e)) if e.to_string().contains("not a regular file")),
                "{odd:?}: {refused:?}"
            );
        }
        assert!(std::fs::symlink_metadata(&fifo)
            .expect("fifo")
            .file_type()
            .is_fifo());
        assert!(std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).expect("target"), b"kept");
        let plain = dir.path().join("plain");
        write_atomically(&plain, |out| Ok(out.write_all(b"body")?)).expect("a new file");
        write_atomically(&plain, |out| Ok(out.write_all(b"new")?)).expect("a regular file");
        assert_eq!(std::fs::read(&plain).expect("plain"), b"new");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".kms-partial-"))
            .collect();
        assert!(left.is_empty(), "staged files left: {left:?}");
    }
}
