//! Path aliases: Work names files as `alias/relative/path`, and the pool's configuration maps
//! each alias to a folder. Wherever the Work runs (the agent, a child process, a container
//! with the folders mounted at the same places), the same name means the same file.
//!
//! A path that would leave its alias's folder is refused: lexically (`..`, an absolute path),
//! and on the file system by [`Aliases::open`] and [`Aliases::create_dir_all`], which resolve
//! the path beneath the folder with `openat2(RESOLVE_BENEATH)`: a symlink that points out
//! (dangling or not, absolute or through `..`) is refused by the kernel as the file is
//! opened, so no race between a check and the open is left. Where `openat2` is missing
//! (Linux before 5.6, or a seccomp profile that refuses it), each component is opened with
//! `O_NOFOLLOW` instead, which refuses every symlink, even one that stays inside.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, mkdirat};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} names no alias: write it as `alias/relative/path`")]
    NoAlias(String),
    #[error("unknown alias {alias:?} in {path:?}; this pool maps: {known}")]
    UnknownAlias {
        alias: String,
        path: String,
        known: String,
    },
    #[error("path {0:?} leaves its alias's folder, which is not allowed")]
    Escapes(String),
    #[error("invalid alias mapping {0:?}: write it as NAME=DIR")]
    BadMapping(String),
    #[error("cannot open {path:?}: {error}")]
    Io { path: String, error: String },
}

/// How [`Aliases::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Write, creating the file or emptying it.
    Create,
    /// Write at its end, creating the file if needed.
    Append,
}

/// The alias → folder mapping of a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aliases {
    map: BTreeMap<String, PathBuf>,
}

impl Aliases {
    /// Parses `NAME=DIR` mappings (as given to `--alias`). Folders are made absolute.
    pub fn parse(specs: &[String]) -> Result<Self, PathError> {
        let mut map = BTreeMap::new();
        for spec in specs {
            let (name, dir) = spec
                .split_once('=')
                .ok_or_else(|| PathError::BadMapping(spec.clone()))?;
            if rota_common::names::check_name("alias", name).is_err()
                || name.contains('.')
                || dir.is_empty()
            {
                return Err(PathError::BadMapping(spec.clone()));
            }
            let dir = std::path::absolute(dir).map_err(|_| PathError::BadMapping(spec.clone()))?;
            map.insert(name.to_owned(), dir);
        }
        Ok(Self { map })
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_path()))
    }

    /// The path of `alias/relative/path`, refusing any that leaves the alias's folder on its
    /// face, and any whose deepest existing part is a symlink out of it. To read or write the
    /// file, use [`Aliases::open`] or [`Aliases::create_file`]: the file system may change
    /// between this check and a later open by path.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, PathError> {
        let (root, rest) = self.split(path)?;
        let mut existing = rest.as_path();
        while root.join(existing).symlink_metadata().is_err() {
            match existing.parent() {
                Some(p) if !p.as_os_str().is_empty() => existing = p,
                _ => return Ok(root.join(rest)),
            }
        }
        match beneath(&open_root(root, path)?, existing, OFlag::O_PATH, path) {
            Err(e @ PathError::Escapes(_)) => Err(e),
            _ => Ok(root.join(rest)),
        }
    }

    /// Opens the file at `alias/relative/path`, resolved beneath the alias's folder (see the
    /// module's documentation). Its folders must exist (see [`Aliases::create_file`]).
    pub fn open(&self, path: &str, access: Access) -> Result<std::fs::File, PathError> {
        let (root, rest) = self.split(path)?;
        Ok(beneath(&open_root(root, path)?, &rest, access.flags(), path)?.into())
    }

    /// Opens the file at `alias/relative/path` like [`Aliases::open`], first making the
    /// folders above it (each beneath the alias's folder).
    pub fn create_file(&self, path: &str, access: Access) -> Result<std::fs::File, PathError> {
        let (root, rest) = self.split(path)?;
        let folders = rest.parent().unwrap_or(Path::new(""));
        let dir = make_dirs(open_root(root, path)?, folders, path)?;
        let name = Path::new(rest.file_name().unwrap_or_default());
        Ok(beneath(&dir, name, access.flags(), path)?.into())
    }

    /// Makes the folder `alias/relative/path` and those above it, each beneath the alias's
    /// folder.
    pub fn create_dir_all(&self, path: &str) -> Result<(), PathError> {
        let (root, rest) = self.split(path)?;
        make_dirs(open_root(root, path)?, &rest, path).map(drop)
    }

    /// The alias's folder and the rest of `path`, which must stay inside it on its face.
    fn split(&self, path: &str) -> Result<(&Path, PathBuf), PathError> {
        let (alias, rest) = path
            .split_once('/')
            .ok_or_else(|| PathError::NoAlias(path.to_owned()))?;
        let root = self.map.get(alias).ok_or_else(|| PathError::UnknownAlias {
            alias: alias.to_owned(),
            path: path.to_owned(),
            known: if self.map.is_empty() {
                "no aliases".into()
            } else {
                self.map.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })?;
        let mut out = PathBuf::new();
        for c in Path::new(rest).components() {
            match c {
                Component::Normal(part) => out.push(part),
                Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(PathError::Escapes(path.to_owned()));
                }
            }
        }
        if out.as_os_str().is_empty() {
            return Err(PathError::NoAlias(path.to_owned()));
        }
        Ok((root, out))
    }
}

impl Access {
    fn flags(self) -> OFlag {
        match self {
            Access::Read => OFlag::O_RDONLY,
            Access::Create => OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
            Access::Append => OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND,
        }
    }
}

/// Makes the folders `rest` beneath `dir`, one at a time; returns the last one.
fn make_dirs(mut dir: OwnedFd, rest: &Path, path: &str) -> Result<OwnedFd, PathError> {
    for part in rest.components() {
        let part = Path::new(part.as_os_str());
        match mkdirat(&dir, part, Mode::from_bits_truncate(0o777)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io(path, e)),
        }
        dir = beneath(&dir, part, OFlag::O_PATH | OFlag::O_DIRECTORY, path)?;
    }
    Ok(dir)
}

fn open_root(root: &Path, path: &str) -> Result<OwnedFd, PathError> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    nix::fcntl::open(root, flags, Mode::empty()).map_err(|e| PathError::Io {
        path: path.to_owned(),
        error: format!("its alias's folder {}: {e}", root.display()),
    })
}

/// Opens `rest` beneath the folder `dir` with `flags` (new files get mode 0666 before the
/// umask). `path` names it in errors.
fn beneath(dir: &impl AsFd, rest: &Path, flags: OFlag, path: &str) -> Result<OwnedFd, PathError> {
    let flags = flags | OFlag::O_CLOEXEC;
    let mode = Mode::from_bits_truncate(0o666);
    let how = OpenHow::new()
        .flags(flags)
        .mode(if flags.contains(OFlag::O_CREAT) {
            mode
        } else {
            Mode::empty()
        })
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match openat2(dir, rest, how) {
        Ok(fd) => Ok(fd),
        Err(Errno::EXDEV) => Err(PathError::Escapes(path.to_owned())),
        Err(Errno::ENOSYS | Errno::EPERM) => walk(dir, rest, flags, mode, path),
        Err(e) => Err(io(path, e)),
    }
}

/// [`beneath`] without `openat2`: one component at a time, none of them a symlink.
fn walk(
    dir: &impl AsFd,
    rest: &Path,
    flags: OFlag,
    mode: Mode,
    path: &str,
) -> Result<OwnedFd, PathError> {
    let refuse = |e: Errno| match e {
        // A symlink as the last component (O_NOFOLLOW), or as a folder on the way.
        Errno::ELOOP | Errno::ENOTDIR => PathError::Escapes(path.to_owned()),
        e => io(path, e),
    };
    let parts: Vec<_> = rest.components().collect();
    let Some((last, folders)) = parts.split_last() else {
        return Err(PathError::NoAlias(path.to_owned()));
    };
    let mut here: Option<OwnedFd> = None;
    for part in folders {
        let at = here.as_ref().map_or(dir.as_fd(), |fd| fd.as_fd());
        let next = openat(
            at,
            part.as_os_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(refuse)?;
        here = Some(next);
    }
    let at = here.as_ref().map_or(dir.as_fd(), |fd| fd.as_fd());
    openat(at, last.as_os_str(), flags | OFlag::O_NOFOLLOW, mode).map_err(refuse)
}

fn io(path: &str, e: Errno) -> PathError {
    PathError::Io {
        path: path.to_owned(),
        error: e.desc().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aliases(dir: &Path) -> Aliases {
        Aliases::parse(&[format!("demodata={}", dir.display())]).expect("valid mapping")
    }

    #[test]
    fn resolves_inside_the_alias() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = aliases(dir.path());
        assert_eq!(
            a.resolve("demodata/report.pdf").expect("ok"),
            dir.path().join("report.pdf")
        );
        assert_eq!(
            a.resolve("demodata/./x/y.txt").expect("ok"),
            dir.path().join("x/y.txt")
        );
    }

    #[test]
    fn refuses_escapes_and_unknown_aliases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = aliases(dir.path());
        for bad in [
            "demodata/../etc/passwd",
            "demodata/x/../../y",
            "demodata//etc/passwd",
            "demodata/",
        ] {
            assert!(a.resolve(bad).is_err(), "{bad} was accepted");
        }
        assert!(matches!(
            a.resolve("other/x"),
            Err(PathError::UnknownAlias { .. })
        ));
        assert!(matches!(
            a.resolve("report.pdf"),
            Err(PathError::NoAlias(_))
        ));
    }

    #[test]
    fn refuses_a_symlink_that_points_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).expect("symlink");
        let a = aliases(dir.path());
        assert!(matches!(
            a.resolve("demodata/link/secret"),
            Err(PathError::Escapes(_))
        ));
    }

    #[test]
    fn a_write_through_a_dangling_symlink_out_is_refused_and_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().join("planted");
        std::os::unix::fs::symlink(&target, dir.path().join("link")).expect("symlink");
        std::os::unix::fs::symlink("../../x", dir.path().join("up")).expect("symlink");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).expect("symlink");
        let a = aliases(dir.path());
        for path in [
            "demodata/link",
            "demodata/up",
            "demodata/out/planted",
            "demodata/out/a/b",
        ] {
            for access in [Access::Create, Access::Append] {
                assert_eq!(
                    a.create_file(path, access).err(),
                    Some(PathError::Escapes(path.into())),
                    "{path}"
                );
            }
            assert!(
                matches!(a.resolve(path), Err(PathError::Escapes(_))),
                "{path}"
            );
        }
        assert!(matches!(
            a.create_dir_all("demodata/out/sub"),
            Err(PathError::Escapes(_))
        ));
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("listed").count(),
            0
        );
    }

    #[test]
    fn files_and_folders_are_made_beneath_the_alias_and_inner_symlinks_work() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().expect("tempdir");
        let a = aliases(dir.path());
        let mut f = a
            .create_file("demodata/x/y/z.txt", Access::Create)
            .expect("made");
        f.write_all(b"one").expect("written");
        std::os::unix::fs::symlink("x/y", dir.path().join("short")).expect("symlink");
        let mut text = String::new();
        a.open("demodata/short/z.txt", Access::Read)
            .expect("a symlink that stays inside")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "one");
        let mut f = a
            .open("demodata/x/y/z.txt", Access::Append)
            .expect("opened");
        f.write_all(b" two").expect("written");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("x/y/z.txt")).expect("read"),
            "one two"
        );
    }

    #[test]
    fn without_openat2_every_symlink_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("x")).expect("folder");
        std::os::unix::fs::symlink(outside.path().join("p"), dir.path().join("link"))
            .expect("symlink");
        std::os::unix::fs::symlink("x", dir.path().join("inner")).expect("symlink");
        let root = open_root(dir.path(), "t").expect("opened");
        let create = Access::Create.flags() | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(0o666);
        for rest in ["link", "inner/f"] {
            assert!(
                matches!(
                    walk(&root, Path::new(rest), create, mode, "t"),
                    Err(PathError::Escapes(_))
                ),
                "{rest}"
            );
        }
        walk(&root, Path::new("x/f"), create, mode, "t").expect("a plain path");
        assert!(dir.path().join("x/f").is_file());
        assert!(!outside.path().join("p").exists());
    }

    #[test]
    fn refuses_bad_mappings() {
        for bad in ["nodir", "=x", "a b=/tmp", "a.b=/tmp", "x="] {
            assert!(Aliases::parse(&[bad.to_owned()]).is_err(), "{bad} accepted");
        }
    }
}
