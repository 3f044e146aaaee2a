//! The coordinator's at-rest key: what seals model checkpoints (AES-256-GCM, see
//! [`fedpriv_common::seal`]). It comes from a key file (`--at-rest-key-file`, made by
//! `fedpriv-coordinator at-rest-key --out FILE`: 64 hex characters, mode 0600, owned by
//! the user the coordinator runs as) or from the environment variable [`KEY_ENV`]. There
//! is no way to run without one: checkpoints are always encrypted.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use fedpriv_common::seal::{self, SealError, SealKey};

/// The environment variable that may hold the at-rest key (64 hex characters).
pub const KEY_ENV: &str = "FEDPRIV_AT_REST_KEY";

/// Why no key could be had. Every case is the operator's to fix; none carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum AtRestKeyError {
    #[error(
        "no at-rest key: give --at-rest-key-file FILE (make one with `fedpriv-coordinator \
         at-rest-key --out FILE`) or set {KEY_ENV} to 64 hex characters; model checkpoints \
         are always stored encrypted"
    )]
    Missing,
    #[error(
        "both --at-rest-key-file and {KEY_ENV} are set: give only one, so that which key \
         seals the state is never a guess"
    )]
    Both,
    #[error("at-rest key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("at-rest key file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "at-rest key file {} can be read or written by group or others (mode {mode:o}): \
         run `chmod 600 {}` and consider the key exposed (make a new one if others could \
         have read it)",
        path.display(),
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "at-rest key file {} is owned by uid {owner}, not by the user this coordinator runs \
         as (uid {ours}): a key someone else controls is not ours to trust",
        path.display()
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error("at-rest key from {from}: {source}")]
    Material { from: String, source: SealError },
    #[error(
        "{} already exists; a key is never overwritten (checkpoints sealed with it would be \
         lost): choose another path",
        path.display()
    )]
    Exists { path: PathBuf },
}

/// The key from `file` if given, else from [`KEY_ENV`].
pub fn load_key(file: Option<&Path>) -> Result<SealKey, AtRestKeyError> {
    load_key_from(file, std::env::var_os(KEY_ENV))
}

/// [`load_key`] with the environment variable's value passed in (tests must not change the
/// process environment, which other threads read).
pub fn load_key_from(
    file: Option<&Path>,
    env: Option<OsString>,
) -> Result<SealKey, AtRestKeyError> {
    match (file, env) {
        (Some(_), Some(_)) => Err(AtRestKeyError::Both),
        (None, None) => Err(AtRestKeyError::Missing),
        (Some(path), None) => load_key_file(path),
        (None, Some(value)) => SealKey::from_material(value.as_encoded_bytes()).map_err(|source| {
            AtRestKeyError::Material {
                from: format!("environment variable {KEY_ENV}"),
                source,
            }
        }),
    }
}

fn load_key_file(path: &Path) -> Result<SealKey, AtRestKeyError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let io = |source| AtRestKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    // The checks look at the file that was opened, not at the path again (no window for
    // a swap between check and read).
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(AtRestKeyError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(AtRestKeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if let Some(ours) = our_uid() {
        if meta.uid() != ours {
            return Err(AtRestKeyError::Owner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                ours,
            });
        }
    }
    // 64 hex characters and a newline; anything much larger is not a key file.
    let mut text = Vec::with_capacity(80);
    file.take(4096).read_to_end(&mut text).map_err(io)?;
    let key = SealKey::from_material(&text).map_err(|source| AtRestKeyError::Material {
        from: format!("file {}", path.display()),
        source,
    });
    text.fill(0);
    key
}

/// The effective uid of this process, as Linux shows it (the owner of `/proc/self`); `None`
/// where there is no procfs, and then only the mode is checked. (A 0600 file we can read
/// is ours unless we run as root.) std has no `geteuid`, and `unsafe` is forbidden here.
fn our_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Writes a new key (64 hex characters and a newline) to `path`, created with mode 0600;
/// an existing file is never overwritten. Returns the key id (safe to log).
pub fn write_new_key_file(path: &Path) -> Result<String, AtRestKeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let material = seal::generate_key_hex().map_err(|source| AtRestKeyError::Material {
        from: "the system random generator".into(),
        source,
    })?;
    let id = SealKey::from_material(material.as_bytes())
        .map_err(|source| AtRestKeyError::Material {
            from: "the system random generator".into(),
            source,
        })?
        .id_hex();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                AtRestKeyError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                AtRestKeyError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    file.write_all(format!("{material}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| AtRestKeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn new_key_file_is_0600_loads_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("at-rest.key");
        let id = write_new_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_key_from(Some(&path), None).unwrap().id_hex(), id);
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(
            write_new_key_file(&path),
            Err(AtRestKeyError::Exists { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), before, "key overwritten");
        // Stricter than 0600 is fine too.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_key_from(Some(&path), None).unwrap().id_hex(), id);
    }

    #[test]
    fn group_or_world_readable_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("at-rest.key");
        write_new_key_file(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = load_key_from(Some(&path), None).unwrap_err();
            assert!(
                matches!(err, AtRestKeyError::Permissions { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        // A directory is not a key file.
        assert!(matches!(
            load_key_from(Some(dir.path()), None),
            Err(AtRestKeyError::NotAFile { .. })
        ));
    }

    #[test]
    fn key_from_the_environment_value() {
        let material = seal::generate_key_hex().unwrap();
        let want = SealKey::from_material(material.as_bytes())
            .unwrap()
            .id_hex();
        let got = load_key_from(None, Some(format!("{material}\n").into())).unwrap();
        assert_eq!(got.id_hex(), want);
        let err = load_key_from(None, Some("not a key".into())).unwrap_err();
        assert!(err.to_string().contains(KEY_ENV), "{err}");
        assert!(!err.to_string().contains("not a key"), "{err}");
        assert!(matches!(
            load_key_from(None, None),
            Err(AtRestKeyError::Missing)
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_new_key_file(&path).unwrap();
        assert!(matches!(
            load_key_from(Some(&path), Some(material.into())),
            Err(AtRestKeyError::Both)
        ));
    }
}
