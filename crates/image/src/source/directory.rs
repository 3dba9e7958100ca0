//! A plain directory holding a root filesystem becomes one uncompressed tar layer,
//! written deterministically (sorted names, metadata from lstat) so the same tree
//! gets the same digest. Symlinks are stored, never followed; every read goes
//! through `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType};
use tar::{EntryType, Header};

use super::{synthesized_digest, LayerBlob, Prepared};
use crate::compression::Compression;
use crate::config::{ImageConfig, DEFAULT_PATH};
use crate::confined::{list_dir, open_dir_beneath, open_file_beneath, Confined};
use crate::{digest, ImageError, Limits};

struct Walk<'a> {
    src: &'a Confined,
    builder: tar::Builder<BufWriter<File>>,
    limits: &'a Limits,
    entries: u64,
    bytes: u64,
    /// (dev, ino) → first path, to store hardlinks as links.
    links: HashMap<(u64, u64), PathBuf>,
}

pub(crate) fn prepare(dir: &Path, work: &Path, limits: &Limits) -> Result<Prepared, ImageError> {
    let src = Confined::open(dir).map_err(|source| ImageError::SourceRead {
        source_path: dir.to_path_buf(),
        path: dir.to_path_buf(),
        source,
    })?;
    let layer_path = work.join("layer.tar");
    let file = File::create(&layer_path).map_err(ImageError::store(&layer_path))?;
    let mut walk = Walk {
        src: &src,
        builder: tar::Builder::new(BufWriter::new(file)),
        limits,
        entries: 0,
        bytes: 0,
        links: HashMap::new(),
    };
    walk.dir(PathBuf::new())?;
    let out = walk
        .builder
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(ImageError::store(&layer_path))?;
    out.sync_all().map_err(ImageError::store(&layer_path))?;
    drop(out);

    let file = File::open(&layer_path).map_err(ImageError::store(&layer_path))?;
    let (layer_digest, size) = digest::of_reader(&file).map_err(ImageError::store(&layer_path))?;
    let config_bytes = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": [DEFAULT_PATH] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .unwrap_or_default();
    let digest = synthesized_digest(
        &config_bytes,
        &[(layer_digest.clone(), size, Compression::None)],
    );
    Ok(Prepared {
        digest,
        config: ImageConfig::for_directory(),
        layers: vec![LayerBlob {
            digest: layer_digest,
            size: Some(size),
            compression: Compression::None,
            file,
            verified: true,
        }],
        blobs: Vec::new(),
    })
}

impl Walk<'_> {
    fn dir(&mut self, rel: PathBuf) -> Result<(), ImageError> {
        let fd = open_dir_beneath(self.src.fd(), &rel).map_err(|e| self.read_err(&rel, e))?;
        let mut names: Vec<OsString> = list_dir(fd.as_fd()).map_err(|e| self.read_err(&rel, e))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = rel.join(&name);
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(ImageError::LimitExceeded {
                    object: format!("directory {}", self.src.path().display()),
                    limit: "max_entries",
                    max: self.limits.max_entries,
                });
            }
            let st = rfs::statat(&fd, &name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| self.read_err(&path, e.into()))?;
            let mut header = Header::new_gnu();
            header.set_mode(st.st_mode & 0o7777);
            header.set_uid(st.st_uid.into());
            header.set_gid(st.st_gid.into());
            header.set_mtime(st.st_mtime.max(0) as u64);
            header.set_size(0);
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    header.set_entry_type(EntryType::Directory);
                    self.append(&mut header, &path, io::empty())?;
                    self.dir(path)?;
                }
                FileType::RegularFile => {
                    let key = (st.st_dev, st.st_ino);
                    if st.st_nlink > 1 {
                        if let Some(first) = self.links.get(&key).cloned() {
                            header.set_entry_type(EntryType::Link);
                            self.builder
                                .append_link(&mut header, &path, &first)
                                .map_err(|e| self.read_err(&path, e))?;
                            continue;
                        }
                        self.links.insert(key, path.clone());
                    }
                    let file = open_file_beneath(self.src.fd(), &path)
                        .map_err(|e| self.read_err(&path, e))?;
                    let size = file.metadata().map_err(|e| self.read_err(&path, e))?.len();
                    self.bytes += size;
                    if self.bytes > self.limits.max_layer_bytes {
                        return Err(ImageError::LimitExceeded {
                            object: format!("directory {}", self.src.path().display()),
                            limit: "max_layer_bytes",
                            max: self.limits.max_layer_bytes,
                        });
                    }
                    header.set_entry_type(EntryType::Regular);
                    header.set_size(size);
                    // why: a file that shrinks while being read would corrupt the tar; fail instead.
                    let exact = ExactReader {
                        inner: file.take(size),
                        left: size,
                    };
                    self.append(&mut header, &path, exact)?;
                }
                FileType::Symlink => {
                    let target = rfs::readlinkat(&fd, &name, Vec::new())
                        .map_err(|e| self.read_err(&path, e.into()))?;
                    header.set_entry_type(EntryType::Symlink);
                    let target = PathBuf::from(std::ffi::OsStr::from_bytes(target.as_bytes()));
                    self.builder
                        .append_link(&mut header, &path, &target)
                        .map_err(|e| self.read_err(&path, e))?;
                }
                other => {
                    tracing::warn!(path = %path.display(), kind = ?other, "skipping device node, fifo or socket in directory import")
                }
            }
        }
        Ok(())
    }

    fn append(
        &mut self,
        header: &mut Header,
        path: &Path,
        data: impl Read,
    ) -> Result<(), ImageError> {
        self.builder
            .append_data(header, path, data)
            .map_err(|e| self.read_err(path, e))
    }

    fn read_err(&self, path: &Path, source: io::Error) -> ImageError {
        ImageError::SourceRead {
            source_path: self.src.path().to_path_buf(),
            path: path.to_path_buf(),
            source,
        }
    }
}

struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being read",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
