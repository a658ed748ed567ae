//! Path aliases: Work names files as `alias/relative/path`, and the pool's configuration maps
//! each alias to a folder. Wherever the Work runs (the agent, a child process, a container
//! with the folders mounted at the same places), the same name means the same file. A path
//! that would leave its alias's folder (`..`, an absolute path, a symlink pointing out) is
//! refused.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

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

    /// The real path of `alias/relative/path`, refusing any that leaves the alias's folder.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, PathError> {
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
        let mut out = root.clone();
        for c in Path::new(rest).components() {
            match c {
                Component::Normal(part) => out.push(part),
                Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(PathError::Escapes(path.to_owned()));
                }
            }
        }
        if out == *root {
            return Err(PathError::NoAlias(path.to_owned()));
        }
        // A symlink inside the folder may point outside it: check the real location of the
        // deepest part that exists.
        let real_root = root.canonicalize().unwrap_or_else(|_| root.clone());
        let mut existing = out.as_path();
        while !existing.exists() {
            match existing.parent() {
                Some(p) => existing = p,
                None => break,
            }
        }
        if let Ok(real) = existing.canonicalize()
            && !real.starts_with(&real_root)
            && existing.starts_with(root)
        {
            return Err(PathError::Escapes(path.to_owned()));
        }
        Ok(out)
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
    fn refuses_bad_mappings() {
        for bad in ["nodir", "=x", "a b=/tmp", "a.b=/tmp", "x="] {
            assert!(Aliases::parse(&[bad.to_owned()]).is_err(), "{bad} accepted");
        }
    }
}
