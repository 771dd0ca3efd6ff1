//! The initramfs as a tree of entries: host files mirrored at their own paths (with the symlinks
//! on the way and the `ldd` closure of binaries), generated files, and the cpio writer.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cpio;

/// Entries by path inside the image (no leading `/`), written in path order, which puts every
/// directory before its contents.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tree {
    entries: BTreeMap<String, Node>,
}

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File { src: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDevice(u32, u32),
}

impl Tree {
    /// Adds the directory `path` and its parents.
    pub(crate) fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut at = 0;
        while at < path.len() {
            let end = path[at..].find('/').map_or(path.len(), |i| at + i);
            self.entries
                .entry(path[..end].to_string())
                .or_insert(Node::Dir);
            at = end + 1;
        }
    }

    /// Adds the host file `src` at `path`, with `mode`'s permission bits.
    pub(crate) fn file(&mut self, path: &str, src: &Path, mode: u32) {
        self.leaf(
            path,
            Node::File {
                src: src.to_path_buf(),
                mode,
            },
        );
    }

    /// Adds a file holding `data`.
    pub(crate) fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.leaf(
            path,
            Node::Bytes {
                data: data.into(),
                mode,
            },
        );
    }

    /// Adds a symlink at `path` pointing to `target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        self.leaf(path, Node::Symlink(target.into()));
    }

    /// Adds a character device node.
    pub(crate) fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.leaf(path, Node::CharDevice(major, minor));
    }

    /// Mirrors the host path `path` (absolute) at the same place: every symlink on the way is
    /// recreated and followed, so `/bin/sh` brings `bin -> usr/bin`, `usr/bin/sh -> dash` and
    /// `usr/bin/dash`. A directory is added empty. Returns the resolved host path.
    pub(crate) fn host_path(&mut self, path: &Path) -> Result<PathBuf> {
        let mut pending: Vec<PathBuf> = components(path);
        pending.reverse();
        let mut resolved = PathBuf::from("/");
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            if part == Path::new("..") {
                resolved.pop();
                continue;
            }
            let here = resolved.join(&part);
            let meta = fs::symlink_metadata(&here)
                .with_context(|| format!("{} (for {})", here.display(), path.display()))?;
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {}", path.display());
                }
                let target = fs::read_link(&here)?;
                self.symlink(&inside(&here), &target.to_string_lossy());
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                pending.extend(components(&target).into_iter().rev());
            } else if pending.is_empty() && meta.is_file() {
                self.file(&inside(&here), &here, meta.permissions().mode());
                resolved = here;
            } else {
                self.dir(&inside(&here));
                resolved = here;
            }
        }
        Ok(resolved)
    }

    /// Mirrors the host directory `root` recursively, leaving out entries for which `skip`
    /// (given the host path) is true. Symlinks inside are followed like [`Self::host_path`].
    pub(crate) fn host_tree(&mut self, root: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
        let resolved = self.host_path(root)?;
        let mut stack = vec![resolved];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
                let path = entry?.path();
                if skip(&path) {
                    continue;
                }
                let meta = fs::symlink_metadata(&path)?;
                if meta.is_dir() {
                    self.dir(&inside(&path));
                    stack.push(path);
                } else if meta.file_type().is_symlink() && fs::metadata(&path).is_err() {
                    let target = fs::read_link(&path)?;
                    self.symlink(&inside(&path), &target.to_string_lossy()); // dangling: keep
                } else {
                    self.host_path(&path)?;
                }
            }
        }
        Ok(())
    }

    /// Mirrors the host executable or shared library `path` and its `ldd` closure (the dynamic
    /// loader included).
    pub(crate) fn host_binary(&mut self, path: &Path) -> Result<()> {
        self.host_path(path)?;
        self.libraries_of(path)
    }

    /// Adds the shared libraries (and loader) the host binary `path` needs, at their host paths.
    pub(crate) fn libraries_of(&mut self, path: &Path) -> Result<()> {
        for lib in ldd(path)? {
            self.host_path(&lib)?;
        }
        Ok(())
    }

    /// Total bytes of file data (what the guest keeps in RAM).
    pub(crate) fn data_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|n| match n {
                Node::File { src, .. } => fs::metadata(src).map_or(0, |m| m.len()),
                Node::Bytes { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Writes the tree as an uncompressed newc cpio archive to `out`.
    pub(crate) fn write_cpio(&self, out: &Path) -> Result<()> {
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut w = cpio::Writer::new(BufWriter::with_capacity(1 << 20, file));
        for (name, node) in &self.entries {
            let header = |mode, size| cpio::Header::new(name, mode, size);
            match node {
                Node::Dir => w.entry(header(cpio::DIR | 0o755, 0), &[])?,
                Node::Symlink(target) => w.entry(
                    header(cpio::SYMLINK | 0o777, target.len() as u64),
                    target.as_bytes(),
                )?,
                Node::CharDevice(major, minor) => w.entry(
                    cpio::Header {
                        rdev: (*major, *minor),
                        ..header(cpio::CHAR_DEVICE | 0o600, 0)
                    },
                    &[],
                )?,
                Node::Bytes { data, mode } => w.entry(
                    header(cpio::FILE | (mode & 0o7777), data.len() as u64),
                    data,
                )?,
                Node::File { src, mode } => {
                    let mut f =
                        File::open(src).with_context(|| format!("opening {}", src.display()))?;
                    let meta = f.metadata()?;
                    let mtime = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
                    let h = cpio::Header {
                        mtime,
                        ..header(cpio::FILE | (mode & 0o7777), meta.len())
                    };
                    w.file(h, &mut f)
                        .with_context(|| format!("packing {}", src.display()))?;
                }
            }
        }
        w.finish()
            .with_context(|| format!("writing {}", out.display()))?;
        Ok(())
    }

    fn leaf(&mut self, path: &str, node: Node) {
        let path = path.trim_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.insert(path.to_string(), node);
    }
}

/// The shared libraries (and loader) `ldd` lists for `path`; empty for a static binary.
pub(crate) fn ldd(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if text.contains("statically linked") || err.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed: {}", path.display(), err.trim());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("{}: shared library {line}", path.display());
        }
        let candidate = match line.split_once("=>") {
            Some((_, right)) => right.trim(),
            None => line,
        };
        if let Some(lib) = candidate.split_whitespace().next() {
            if lib.starts_with('/') {
                libs.push(PathBuf::from(lib));
            }
        }
    }
    Ok(libs)
}

/// The path inside the image of the absolute host path `p`.
fn inside(p: &Path) -> String {
    p.to_string_lossy().trim_start_matches('/').to_string()
}

/// The normal and `..` components of `p`, each as a one-component path.
fn components(p: &Path) -> Vec<PathBuf> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(PathBuf::from(s)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ambit-initramfs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn host_path_recreates_symlinks_on_the_way() {
        let root = scratch("links");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin/dash"), "x").unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        symlink("dash", root.join("usr/bin/sh")).unwrap();
        let mut tree = Tree::default();
        let resolved = tree.host_path(&root.join("bin/sh")).unwrap();
        assert_eq!(resolved, root.join("usr/bin/dash"));
        let r = inside(&root);
        assert!(
            matches!(tree.entries[&format!("{r}/bin")], Node::Symlink(ref t) if t == "usr/bin")
        );
        assert!(
            matches!(tree.entries[&format!("{r}/usr/bin/sh")], Node::Symlink(ref t) if t == "dash")
        );
        assert!(matches!(
            tree.entries[&format!("{r}/usr/bin/dash")],
            Node::File { .. }
        ));
        assert!(matches!(tree.entries[&format!("{r}/usr")], Node::Dir));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn parents_are_written_before_children() {
        let mut tree = Tree::default();
        tree.bytes("a/b/c", "x", 0o644);
        tree.bytes("a-z", "y", 0o644);
        let names: Vec<_> = tree.entries.keys().cloned().collect();
        assert_eq!(names, ["a", "a-z", "a/b", "a/b/c"]);
    }

    #[test]
    fn ldd_of_a_dynamic_binary_includes_libc() {
        let libs = ldd(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}
