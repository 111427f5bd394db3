//! Stable inode numbers for paths under the backing dir. A path keeps its number until it is
//! unlinked or renamed over; a rename carries the number (and so the file's cache) along.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// FUSE's root inode.
pub(crate) const ROOT_INO: u64 = 1;

pub(crate) struct Inodes {
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next: u64,
}

impl Inodes {
    pub(crate) fn new() -> Inodes {
        let mut inodes = Inodes { paths: HashMap::new(), inos: HashMap::new(), next: ROOT_INO + 1 };
        inodes.paths.insert(ROOT_INO, PathBuf::new());
        inodes.inos.insert(PathBuf::new(), ROOT_INO);
        inodes
    }

    /// The path of `ino` relative to the backing dir.
    pub(crate) fn path(&self, ino: u64) -> Option<&Path> {
        self.paths.get(&ino).map(PathBuf::as_path)
    }

    /// The number of `rel`, given one if it has none yet.
    pub(crate) fn ino_of(&mut self, rel: &Path) -> u64 {
        if let Some(&ino) = self.inos.get(rel) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.paths.insert(ino, rel.to_path_buf());
        self.inos.insert(rel.to_path_buf(), ino);
        ino
    }

    /// `rel` is gone (unlinked, removed); returns the number it had.
    pub(crate) fn remove(&mut self, rel: &Path) -> Option<u64> {
        let ino = self.inos.remove(rel)?;
        self.paths.remove(&ino);
        Some(ino)
    }

    /// `from` was renamed to `to` (and everything under it, for a directory). Returns the number
    /// of what `to` replaced, if it had one.
    pub(crate) fn rename(&mut self, from: &Path, to: &Path) -> Option<u64> {
        let replaced = self.remove(to);
        let moved: Vec<(PathBuf, u64)> =
            self.inos.iter().filter(|(p, _)| p.starts_with(from)).map(|(p, &i)| (p.clone(), i)).collect();
        for (old, ino) in moved {
            let rest = old.strip_prefix(from).expect("filtered on the prefix");
            // `join("")` would add a trailing slash, which names a dir only.
            let new = if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) };
            self.inos.remove(&old);
            self.inos.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
        replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_carries_numbers_and_children() {
        let mut inodes = Inodes::new();
        let d = inodes.ino_of(Path::new("d"));
        let f = inodes.ino_of(Path::new("d/f"));
        let g = inodes.ino_of(Path::new("e"));
        assert_eq!(inodes.rename(Path::new("d"), Path::new("e")), Some(g));
        assert_eq!(inodes.path(d).unwrap().as_os_str(), "e");
        assert_eq!(inodes.path(f), Some(Path::new("e/f")));
        assert_eq!(inodes.path(g), None);
        assert_eq!(inodes.ino_of(Path::new("e/f")), f);
        assert_eq!(inodes.remove(Path::new("e/f")), Some(f));
        assert_ne!(inodes.ino_of(Path::new("e/f")), f);
    }
}
